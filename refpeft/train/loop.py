"""The training loop: micro-batches -> summed gradients -> clipping -> scheduled AdamW / LoRA+ -> new tensors.

One optimiser step t (0-based; G = grad_accum micro-batches of batch_size examples each):

    for j in 1..G:                                  examples data_position + (j-1) b ... (refpeft.train.data)
        L_j, g_j = loss and gradients of the trained tensors     (refpeft.model.decoder: forward,
                   with the backward started from dL_j = 1 / G    causal_lm_loss_*, backward)
                   ("mean"), or from 1 with the loss normalised by the step's counted tokens ("tokens")
    g       = g_1 + ... + g_G                                    (refpeft.train.gradients)
    g, |g|  = clip_by_global_norm(g, max_grad_norm)              torch.nn.utils.clip_grad_norm_
    lr_i    = base lr of group i * f(t)                          LambdaLR (refpeft.train.schedules)
    params  = adam_step(params, g, state, groups at lr_i)        torch.optim.AdamW (refpeft.optim)
    model   = with_parameters(model, params)                     ModuleAdapter.replace / new weights

which is transformers' Trainer order (clip, optimizer.step(), scheduler.step()). An AdaLoRA run
(`AdaloraTraining`) adds the orthogonality term to the step's loss and gradient before clipping and
allocates the ranks after the update (refpeft.train.adalora_training). The step's loss
is sum_j L_j / G ("mean"; what Trainer logs) or the token-weighted mean ("tokens"). With a
`Forgetting`, each micro-batch also carries its distillation and class-prior terms, rehearsal
mixes general examples into the batches, and the EWC penalty's gradient joins before clipping
(refpeft.train.objective); the report gives each term.

`train` runs steps until `config.steps` (or `stop_after`, as if interrupted), calls `progress`
with a StepReport after each, and when given a directory saves a checkpoint every `save_every`
steps and at the end (refpeft.train.checkpoints), from which `resume` continues bit for bit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from refpeft.errors import ConfigError
from refpeft.model.decoder import Model
from refpeft.model.prompt_methods import virtual_tokens
from refpeft.optim import ParamGroup, adam_step
from refpeft.train.adalora_training import AdaloraTraining, allocate, orthogonality_term
from refpeft.train.adapters import optimizer_groups, trainable_parameters, with_parameters
from refpeft.train.checkpoints import save_checkpoint
from refpeft.train.data import TokenDataset
from refpeft.train.gradients import add_gradients, clip_by_global_norm, global_norm
from refpeft.train.objective import Forgetting, add_terms, micro_batch_terms, prior_terms, step_batches, step_penalty
from refpeft.train.prompt_learning import encoder_gradients
from refpeft.train.schedules import lr_multiplier
from refpeft.train.state import TrainingConfig, TrainingState


@dataclass(frozen=True)
class StepReport:
    """What one optimiser step did, for a progress bar or a log."""

    step: int                 # steps done, 1 .. total
    total: int
    loss: float
    lr: float                 # the base learning rate times the schedule's multiplier
    grad_norm: float          # the global norm before clipping
    tokens: int               # tokens read (padding excluded)
    seconds: float
    terms: dict[str, float] = field(default_factory=dict)   # the loss's parts: task, distill, prior, ewc

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


def training_step(state: TrainingState, dataset: TokenDataset, config: TrainingConfig,
                  groups: list[ParamGroup], forgetting: Forgetting | None = None,
                  adalora: AdaloraTraining | None = None) -> tuple[TrainingState, StepReport]:
    """One optimiser step (module docstring; with `forgetting`, refpeft.train.objective's terms too;
    with `adalora`, the orthogonality term and the rank allocation): the next state and its report."""
    started = time.perf_counter()
    b, G = config.batch_size, config.grad_accum
    batches = step_batches(dataset, forgetting, position=state.data_position, size=b, count=G, seed=config.seed)
    if config.accumulation == "mean":
        weight, num_items = 1.0 / G, None
    else:
        weight, num_items = 1.0, sum(batch.targets for batch in batches)
        if num_items == 0:
            raise ConfigError(f"step {state.step + 1} has no counted target token in its {G * b} examples")
    terms, grads = {}, None
    for j, batch in enumerate(batches):
        terms_j, grads_j = micro_batch_terms(state.model, batch, forgetting, loss_weight=weight, count=G,
                                             num_items_in_batch=num_items)
        terms, grads = add_terms(terms, terms_j), add_gradients(grads, grads_j)
        if forgetting is not None and forgetting.prior_weight:
            terms_j, grads_j = prior_terms(state.model, forgetting, position=state.data_position + j * b, size=b,
                                           count=G, seed=config.seed)
            terms, grads = add_terms(terms, terms_j), add_gradients(grads, grads_j)
    grads = encoder_gradients(state.model, grads)          # prompt learning: d(prompt) -> the encoder's tensors
    penalty, penalty_grads = step_penalty(state.model, forgetting)
    terms, grads = add_terms(terms, penalty), add_gradients(grads, penalty_grads) if penalty_grads else grads
    if adalora is not None:
        orthogonality, orthogonality_grads = orthogonality_term(state.model, adalora)
        terms = add_terms(terms, orthogonality)
        grads = {**grads, **{name: grads[name] + g for name, g in orthogonality_grads.items()}}
    loss = sum(terms.values())
    if config.max_grad_norm is not None:
        grads, norm = clip_by_global_norm(grads, config.max_grad_norm)
    else:
        norm = global_norm(grads)
    f = lr_multiplier(config.schedule, state.step, warmup_steps=config.warmup_steps, total_steps=config.steps)
    scheduled = [replace(g, config=replace(g.config, lr=g.config.lr * f)) for g in groups]
    params, adam = adam_step(trainable_parameters(state.model), grads, state.adam, scheduled)
    model, allocator = with_parameters(state.model, params), state.adalora
    if adalora is not None:
        model, allocator = allocate(state.step, model, grads, allocator, adalora)
    new_state = TrainingState(model=model, adam=adam, step=state.step + 1, data_position=state.data_position + G * b,
                              adalora=allocator)
    report = StepReport(step=new_state.step, total=config.steps, loss=loss, lr=config.lr * f, grad_norm=float(norm),
                        tokens=sum(batch.tokens for batch in batches), seconds=time.perf_counter() - started,
                        terms=terms)
    return new_state, report


def train(model: Model, dataset: TokenDataset, config: TrainingConfig, *, state: TrainingState | None = None,
          checkpoint_dir: str | Path | None = None, save_every: int = 0, stop_after: int | None = None,
          progress: Callable[[StepReport], None] | None = None, forgetting: Forgetting | None = None,
          adalora: AdaloraTraining | None = None) -> TrainingState:
    """Train `model` (its adapter, or every weight when it has none) on `dataset`; the final state.

    state: continue from it (refpeft.train.checkpoints.resume) instead of from step 0.
    checkpoint_dir: save a checkpoint there every `save_every` steps (0: never) and after the last step run.
    stop_after: stop once this many steps are done (the schedule still spans config.steps).
    adalora: an AdaLoRA run's settings (its schedule's total_step must be config.steps); such a run
    keeps its allocator in memory only, so it takes no checkpoint_dir.
    """
    if adalora is not None and checkpoint_dir is not None:
        raise ConfigError("an AdaLoRA run is not checkpointed (its allocator state is not saved yet): "
                          "pass no checkpoint_dir")
    if adalora is not None and adalora.schedule.total_step != config.steps:
        raise ConfigError(f"AdaLoRA's total_step ({adalora.schedule.total_step}) must be the run's steps "
                          f"({config.steps})")
    if save_every < 0:
        raise ConfigError(f"save_every must be 0 (only at the end) or positive, got {save_every}")
    k = virtual_tokens(model)                      # prompt learning's virtual tokens take the first k positions
    if model.config.max_position_embeddings < k + dataset.block_size:
        raise ConfigError(f"block size {dataset.block_size}{f' after {k} virtual tokens' if k else ''} exceeds the "
                          f"model's max_position_embeddings ({model.config.max_position_embeddings})")
    state = TrainingState(model=model) if state is None else state
    groups = optimizer_groups(state.model, trainable_parameters(state.model), config.adam(),
                              loraplus_ratio=config.loraplus_ratio)
    last = config.steps if stop_after is None else min(stop_after, config.steps)
    fingerprint = None if checkpoint_dir is None else dataset.fingerprint()
    while state.step < last:
        state, report = training_step(state, dataset, config, groups, forgetting, adalora)
        if progress is not None:
            progress(report)
        if checkpoint_dir is not None and (state.step == last or (save_every and state.step % save_every == 0)):
            save_checkpoint(checkpoint_dir, state, config, groups, data_fingerprint=fingerprint)
    return state
