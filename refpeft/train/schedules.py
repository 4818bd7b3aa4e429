"""Learning-rate schedules: the multiplier on the base lr at each optimiser step, as transformers computes it.

transformers' `get_{constant,linear,cosine}_schedule_with_warmup` (transformers/optimization.py)
wrap a `torch.optim.lr_scheduler.LambdaLR`, which sets each group's lr to `base_lr * f(t)`, where t
counts the optimiser steps already taken: the first update (t = 0) uses f(0), and
`scheduler.step()` after each `optimizer.step()` moves to the next. With W warm-up steps and
T training steps (Python floats throughout, in transformers' order of operations):

    warm-up, t < W:   f(t) = t / max(1, W)                                  all three schedules
    constant:         f(t) = 1
    linear:           f(t) = max(0, (T - t) / max(1, T - W))
    cosine:           f(t) = max(0, 0.5 (1 + cos(pi * c * 2 * p))),   p = (t - W) / max(1, T - W),
                      c = num_cycles = 0.5 (one half-wave from 1 down to 0)

So with warm-up the first update has lr 0, as in transformers' Trainer. (transformers 5 defines the
cosine lambda twice in optimization.py; the later one, which wins, adds `min_lr_rate` with
default 0: factor * (1 - 0) + 0, the same value.) The lr an update uses is `base_lr * f(t)`, the
product LambdaLR forms, so refpeft's lr is the same float as torch's.
"""

from __future__ import annotations

import math

from refpeft.errors import ConfigError

SCHEDULES = ("constant", "linear", "cosine")


def warmup_multiplier(step: int, *, warmup_steps: int) -> float:
    """t / max(1, W): the linear warm-up from 0 that precedes every schedule."""
    return float(step) / float(max(1, warmup_steps))


def constant_multiplier(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """transformers' `get_constant_schedule_with_warmup`: warm-up, then 1."""
    return warmup_multiplier(step, warmup_steps=warmup_steps) if step < warmup_steps else 1.0


def linear_multiplier(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """transformers' `get_linear_schedule_with_warmup`: warm-up, then linear decay to 0 at T."""
    if step < warmup_steps:
        return warmup_multiplier(step, warmup_steps=warmup_steps)
    return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))


def cosine_multiplier(step: int, *, warmup_steps: int, total_steps: int, num_cycles: float = 0.5) -> float:
    """transformers' `get_cosine_schedule_with_warmup`: warm-up, then a cosine from 1 to 0 (num_cycles 0.5)."""
    if step < warmup_steps:
        return warmup_multiplier(step, warmup_steps=warmup_steps)
    progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))


_MULTIPLIERS = {"constant": constant_multiplier, "linear": linear_multiplier, "cosine": cosine_multiplier}


def lr_multiplier(schedule: str, step: int, *, warmup_steps: int, total_steps: int) -> float:
    """f(t) of the named schedule for the update after `step` earlier updates (t = 0 is the first)."""
    check_schedule(schedule, warmup_steps=warmup_steps, total_steps=total_steps)
    if step < 0:
        raise ConfigError(f"the step count must be non-negative, got {step}")
    return _MULTIPLIERS[schedule](step, warmup_steps=warmup_steps, total_steps=total_steps)


def check_schedule(schedule: str, *, warmup_steps: int, total_steps: int) -> None:
    """Refuse an unknown schedule name or step counts outside 0 <= W and 1 <= T."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown learning-rate schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if warmup_steps < 0:
        raise ConfigError(f"warm-up steps must be non-negative, got {warmup_steps}")
    if total_steps < 1:
        raise ConfigError(f"the number of training steps must be at least 1, got {total_steps}")
