"""refpeft.train.schedules: the learning rates transformers' schedules give torch's LambdaLR, float for float.

For each schedule and a range of warm-up and total step counts (no warm-up, warm-up longer than
the run, one step), the lr of every optimiser step, read from a torch optimizer driven by
transformers' scheduler through 3 T steps (past the end, where cosine turns back up and linear
stays at 0), equals base_lr * lr_multiplier(...) exactly.
"""

from __future__ import annotations

import pytest

from refpeft.errors import ConfigError
from refpeft.train.schedules import SCHEDULES, lr_multiplier

torch = pytest.importorskip("torch", reason="torch's LambdaLR is the peer")
transformers = pytest.importorskip("transformers")

MAKERS = {"constant": lambda opt, w, t: transformers.get_constant_schedule_with_warmup(opt, w),
          "linear": transformers.get_linear_schedule_with_warmup,
          "cosine": transformers.get_cosine_schedule_with_warmup}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("warmup, total", [(0, 1), (0, 37), (5, 100), (10, 10), (13, 7), (1, 2), (100, 1000)])
def test_multipliers_equal_transformers_lambda_lr(schedule, warmup, total):
    base_lr = 3e-4
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler = MAKERS[schedule](optimizer, warmup, total)
    for step in range(3 * total + 2):
        ours = base_lr * lr_multiplier(schedule, step, warmup_steps=warmup, total_steps=total)
        assert optimizer.param_groups[0]["lr"] == ours, (step, optimizer.param_groups[0]["lr"], ours)
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("schedule, warmup, total, match", [
    ("exponential", 0, 10, "unknown learning-rate schedule 'exponential'"),
    ("cosine", -1, 10, "warm-up steps must be non-negative"),
    ("linear", 0, 0, "at least 1"),
])
def test_bad_schedules_refused(schedule, warmup, total, match):
    with pytest.raises(ConfigError, match=match):
        lr_multiplier(schedule, 0, warmup_steps=warmup, total_steps=total)
