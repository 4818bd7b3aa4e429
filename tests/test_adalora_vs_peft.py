"""AdaLoRA against HF PEFT 0.21.2 on torch CPU in float64: forward, every gradient, the orthogonality
regulariser, a whole trajectory of budgets and masks from PEFT's RankAllocator, and files both ways."""

from __future__ import annotations

import types

import numpy as np
import peft
import torch

from refpeft.adalora_format import read_adalora_adapter, write_adalora_adapter
from refpeft.methods.adalora import adalora_backward, adalora_forward, adalora_orthogonality, adalora_scaling
from refpeft.methods.adalora_allocator import AdaloraSchedule, AdaloraState, adalora_allocate, adalora_apply_masks

PATHS = ("q", "v")
NAMES = ("lora_A", "lora_E", "lora_B")
SCHEDULE = AdaloraSchedule(init_r=4, target_r=2, tinit=3, tfinal=6, deltaT=2, total_step=30, beta1=0.8, beta2=0.7)


class Two(torch.nn.Module):
    """12 -> 8 -> 6; forward returns an object with .loss, so AdaLoraModel adds the regulariser to it."""

    def __init__(self):
        super().__init__()
        self.q, self.v = torch.nn.Linear(12, 8), torch.nn.Linear(8, 6)

    def forward(self, x, target=None):
        y = self.v(torch.tanh(self.q(x)))
        return types.SimpleNamespace(y=y, loss=None if target is None else ((y - target) ** 2).sum())


def peft_model(seed: int = 0, alpha: float = 3.0):
    torch.manual_seed(seed)
    s = SCHEDULE
    config = peft.AdaLoraConfig(init_r=s.init_r, target_r=s.target_r, tinit=s.tinit, tfinal=s.tfinal,
                                deltaT=s.deltaT, total_step=s.total_step, beta1=s.beta1, beta2=s.beta2,
                                lora_alpha=alpha, target_modules=list(PATHS), orth_reg_weight=0.3)
    model = peft.get_peft_model(Two().double(), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.5 * torch.randn_like(p))          # random, non-zero A, E, B
    return model


def layer(model, path):
    return getattr(model.base_model.model, path)


def tensors(model, path) -> dict[str, np.ndarray]:
    return {n: getattr(layer(model, path), n)["default"].detach().numpy().copy() for n in NAMES}


def test_forward_and_every_gradient_equal_peft():
    model = peft_model()
    lin = layer(model, "q")
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 5, 8, dtype=torch.float64)
    y = lin(x)
    (y * dy).sum().backward()
    t = tensors(model, "q")
    ranknum = float(lin.ranknum["default"].detach())
    s = adalora_scaling(3.0, ranknum, 4)
    ours, cache = adalora_forward(x.detach().numpy(), lin.base_layer.weight.detach().numpy(), *(t[n] for n in NAMES),
                                  scaling=s, ranknum=ranknum, bias=lin.base_layer.bias.detach().numpy())
    g = adalora_backward(dy.numpy(), cache)

    def close(a, b):
        b = b.detach().numpy()
        assert np.max(np.abs(a - b)) <= 1e-10 * np.max(np.abs(b)), (a, b)

    close(ours, y)
    close(g.dx, x.grad)
    for n in NAMES:
        close(getattr(g, f"d{n}"), getattr(lin, n)["default"].grad)
    close(g.dranknum, lin.ranknum["default"].grad)     # PEFT 0.21.2 trains ranknum: refpeft models its gradient


def test_orthogonality_regulariser_value_and_gradient_equal_peft():
    model = peft_model(seed=1)
    x, target = torch.randn(4, 12, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    # PEFT adds it in AdaLoraModel.forward (model.base_model; PeftModel.forward skips it), Two.forward does not
    regulariser = model.base_model(x, target).loss - Two.forward(model.base_model.model, x, target).loss
    regulariser.backward()
    reg_peft = float(regulariser.detach())
    factors = {p: (tensors(model, p)["lora_A"], tensors(model, p)["lora_B"]) for p in PATHS}
    value, grads = adalora_orthogonality(factors, weight=0.3)
    assert abs(float(value) - reg_peft) <= 1e-12 * abs(reg_peft) and reg_peft > 0
    for p in PATHS:
        for n, ours in (("lora_A", grads.dlora_A[p]), ("lora_B", grads.dlora_B[p])):
            ref = getattr(layer(model, p), n)["default"].grad.numpy()
            assert np.max(np.abs(ours - ref)) <= 1e-10 * np.max(np.abs(ref))


def run_trajectory(model, steps: int):
    """PEFT's training loop with update_and_allocate after each step; refpeft's allocator fed the same
    parameters and gradients. Yields (step, PEFT's budget, PEFT's rank_pattern or None, refpeft's result)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    gen = torch.Generator().manual_seed(7)
    state = AdaloraState()
    for step in range(steps):
        x, target = torch.randn(8, 12, generator=gen, dtype=torch.float64), torch.randn(8, 6, generator=gen,
                                                                                        dtype=torch.float64)
        model.base_model(x, target).loss.backward()      # with the regulariser, as PEFT trains
        opt.step()
        params = {p: tensors(model, p) for p in PATHS}
        grads = {p: {n: getattr(layer(model, p), n)["default"].grad.numpy().copy() for n in NAMES} for p in PATHS}
        before = model.peft_config["default"].rank_pattern
        model.base_model.update_and_allocate(step)
        after = model.peft_config["default"].rank_pattern
        peft_masks = None if after is before and step <= SCHEDULE.total_step - SCHEDULE.tfinal else after
        state, budget, masks = adalora_allocate(step, state, params, grads, schedule=SCHEDULE)
        # PEFT's E after its masking equals refpeft's masks applied to the same E
        if masks is not None:
            ours = adalora_apply_masks({p: params[p]["lora_E"] for p in PATHS}, masks)
            for p in PATHS:
                assert np.array_equal(ours[p], tensors(model, p)["lora_E"])
        yield step, model.base_model.rankallocator.budget_schedule(step)[0], peft_masks, budget, masks
        opt.zero_grad()


def test_trajectory_of_budgets_and_masks_equals_peft():
    model = peft_model(seed=2)
    masked_steps, patterns = 0, set()
    for step, peft_budget, peft_masks, budget, masks in run_trajectory(model, SCHEDULE.total_step):
        assert budget == peft_budget, step
        if step > SCHEDULE.total_step - SCHEDULE.tfinal:
            peft_masks = model.peft_config["default"].rank_pattern     # re-applied each step
        assert (masks is None) == (peft_masks is None), step
        if masks is not None:
            masked_steps += 1
            for p in PATHS:
                assert [bool(b) for b in masks[p]] == peft_masks[f"{p}.lora_E.default"], (step, p)
            patterns.add(tuple(tuple(bool(b) for b in masks[p]) for p in PATHS))
    assert masked_steps >= 15 and len(patterns) >= 2      # masks were made often, and changed


def test_peft_files_read_and_refpeft_files_load_in_peft(tmp_path):
    model = peft_model(seed=3)
    *_, (_, _, _, _, final) = run_trajectory(model, SCHEDULE.total_step)
    model.save_pretrained(tmp_path / "peft")
    adapter = read_adalora_adapter(tmp_path / "peft")
    full = {p: tensors(model, p) for p in PATHS}
    assert {p: list(m) for p, m in adapter.rank_pattern.items()} == {p: [bool(b) for b in final[p]] for p in PATHS}
    for p in PATHS:
        keep = np.asarray(final[p])
        for n, stored in zip(NAMES, adapter.modules[p]):
            assert np.array_equal(stored, full[p][n][keep] if n != "lora_B" else full[p][n][:, keep])
    # PEFT's loaded model computes what refpeft computes from the file it read
    torch.manual_seed(3)
    loaded = peft.PeftModel.from_pretrained(Two().double(), tmp_path / "peft")
    x = torch.randn(5, 12, dtype=torch.float64)
    with torch.no_grad():
        want = loaded(x).y.numpy()

    def refpeft_forward(read):
        h = x.numpy()
        for p, act in (("q", np.tanh), ("v", lambda a: a)):
            base = getattr(loaded.base_model.model, p).base_layer
            y, _ = adalora_forward(h, base.weight.detach().numpy(), *read.modules[p], scaling=read.scaling(p),
                                   ranknum=float(read.init_r), bias=base.bias.detach().numpy())
            h = act(y)
        return h

    got = refpeft_forward(adapter)
    assert np.max(np.abs(got - want)) <= 1e-10 * np.max(np.abs(want))
    # refpeft writes the full tensors with the final masks; PEFT loads them to the same model
    write_adalora_adapter(tmp_path / "ours", {p: tuple(full[p][n] for n in NAMES) for p in PATHS}, schedule=SCHEDULE,
                          lora_alpha=3.0, rank_pattern=final, orth_reg_weight=0.3)
    torch.manual_seed(3)
    again = peft.PeftModel.from_pretrained(Two().double(), tmp_path / "ours")
    with torch.no_grad():
        assert np.array_equal(again(x).y.numpy(), want)
    back = read_adalora_adapter(tmp_path / "ours")
    for p in PATHS:
        for ours, theirs in zip(back.modules[p], adapter.modules[p]):
            assert np.array_equal(ours, theirs)
