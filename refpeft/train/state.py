"""A training run's settings (`TrainingConfig`) and where it stands (`TrainingState`): plain frozen records.

The state is everything the next step depends on, so saving it and reading it back continues a run
exactly (refpeft.train.checkpoints): the model with its current trained tensors, the optimiser's
moments and step counts, the number of optimiser steps taken (the schedule's t) and the number of
examples read from the data stream (refpeft.train.data: the stream is a pure function of the seed);
an AdaLoRA run's allocator state too (which is not checkpointed: such a run is not resumable).
Nothing else is random: the decoder has no dropout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from refpeft.errors import ConfigError
from refpeft.methods.adalora_allocator import AdaloraState
from refpeft.model.decoder import Model
from refpeft.optim import AdamConfig, AdamState, adamw
from refpeft.train.gradients import check_accumulation
from refpeft.train.schedules import check_schedule


@dataclass(frozen=True)
class TrainingConfig:
    """Hyper-parameters of a run; the defaults are transformers' TrainingArguments' where it has one."""

    steps: int                                  # optimiser steps T (the schedule's length)
    batch_size: int = 8                         # examples per micro-batch
    grad_accum: int = 1                         # micro-batches per optimiser step G
    lr: float = 5e-5                            # base learning rate
    weight_decay: float = 0.0                   # AdamW's decoupled decay (not on biases / norm weights)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "linear"                    # refpeft.train.schedules.SCHEDULES
    max_grad_norm: float | None = 1.0           # None: no clipping
    loraplus_ratio: float | None = None         # PEFT's loraplus_lr_ratio (B matrices at lr * ratio)
    accumulation: str = "mean"                  # refpeft.train.gradients.ACCUMULATIONS
    seed: int = 0                               # the data order's seed

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        check_schedule(self.schedule, warmup_steps=self.warmup_steps, total_steps=self.steps)
        check_accumulation(self.accumulation)
        if self.max_grad_norm is not None and not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ConfigError(f"max_grad_norm must be a positive number (or None: no clipping), "
                              f"got {self.max_grad_norm}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"the learning rate must be a positive number, got {self.lr}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        self.adam()                              # AdamConfig checks betas, eps, weight decay

    def adam(self) -> AdamConfig:
        """torch.optim.AdamW's configuration at the base learning rate."""
        return adamw(lr=self.lr, weight_decay=self.weight_decay, betas=self.betas, eps=self.eps)


@dataclass(frozen=True)
class TrainingState:
    """Where a run stands: the model (its trained tensors current), the optimiser, the step, the data position."""

    model: Model
    adam: AdamState = field(default_factory=AdamState)
    step: int = 0                               # optimiser steps taken
    data_position: int = 0                      # examples consumed from the data stream
    adalora: AdaloraState | None = None         # an AdaLoRA run's allocator (refpeft.train.adalora_training)
