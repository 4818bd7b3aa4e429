"""Many adapters over one frozen linear layer in one batch: the layouts multi-LoRA serving kernels use.

A serving engine keeps S adapters resident ("slots") and runs a batch whose tokens each use one of
them, or none. The adapters are stacked per slot and zero-padded to the largest rank (Punica's BGMV
and SGMV kernels, S-LoRA, vLLM, SGLang, LoRAX):

    A_stack   (S, r_max, k)    slot j's A_j in rows [0, r_j), zeros below
    B_stack   (S, d, r_max)    slot j's B_j in columns [0, r_j), zeros to the right
    s_j                        alpha_j / r_j, or alpha_j / sqrt(r_j) for an rsLoRA slot
    magnitude (S, d)           m_j of a DoRA slot (rows of LoRA slots are not read)

Which slot each token uses comes in one of two layouts:

    BGMV  token_slots (n,)            t_i in {-1, 0, ..., S-1}; -1 means "no adapter"
    SGMV  segment_starts (q+1,)       tokens sorted into q contiguous segments; segment p covers
          segment_slots (q,)          rows [starts[p], starts[p+1]) and uses slot segment_slots[p] (or -1)

SGMV is BGMV with t_i = segment_slots[p] for every row i of segment p (`segment_token_slots`).
For a token x_i (k,) with t_i = j (shapes at line ends; legend: n tokens, k inputs, d outputs):

    shrink_i = x_i A_j^T                                  # (r_max,)  entries r_j.. are 0
    expand_i = s_j * (shrink_i B_j^T)                     # (d,)
    LoRA:  y_i = x_i W0^T + b + expand_i
    DoRA:  y_i = x_i W0^T + b + (g_j - 1) * (x_i W0^T) + g_j * expand_i       g_j = m_j / nu_j
           nu_j = ||W0 + s_j B_j A_j|| row-wise over k (one per output, refpeft.methods.dora)
    none:  y_i = x_i W0^T + b,  shrink_i = 0,  expand_i = 0

Each slot's rows are computed by its method's own forward (refpeft.methods.lora / .dora) on the
unpadded factors, so a batch gives per token exactly what the single-adapter layer gives. Zero
padding changes no value: a padded product adds exact zeros. PEFT's mixed batches
(`model(x, adapter_names=[...])`) compute the same thing per sample for LoRA and refuse DoRA; refpeft
defines the DoRA slot as above, DoRA's forward on that slot's tokens.

The error bounds compose each slot's own chain (`lora_error_chain`, `dora_error_chain`) per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from refpeft.adapter import ModuleAdapter
from refpeft.backend import check_float_array, namespace
from refpeft.errors import ConfigError, InputError, ShapeError
from refpeft.methods import method_spec
from refpeft.methods.dora import dora_error_chain, dora_forward
from refpeft.methods.linear import base_forward
from refpeft.methods.lora import lora_error_chain, lora_forward
from refpeft.tolerance import Bounded, Precision, exact, exact_or_none, matmul, rows, transpose, with_reference

NO_ADAPTER = -1
SLOT_METHODS = ("lora", "dora")


@dataclass(frozen=True)
class SlotStack:
    """S adapters stacked for one layer, zero-padded to the largest rank (see the module docstring)."""

    A: Any                       # (S, r_max, k)
    B: Any                       # (S, d, r_max)
    magnitude: Any               # (S, d) or None when no slot is DoRA
    scalings: tuple[float, ...]  # s_j, float64
    ranks: tuple[int, ...]       # r_j
    methods: tuple[str, ...]     # "lora" or "dora"

    def factors(self, j: int) -> tuple[Any, Any]:
        """Slot j's unpadded A_j (r_j, k) and B_j (d, r_j)."""
        r = self.ranks[j]
        return self.A[j, :r, :], self.B[j, :, :r]


@dataclass(frozen=True)
class BatchOutput:
    """A mixed batch's results: y and the two halves of the adapter path, and DoRA's per-slot scale."""

    y: Any           # (n, d)
    shrink: Any      # (n, r_max)
    expand: Any      # (n, d)
    dora_scale: Any  # (S, d): g_j = m_j / nu_j for DoRA slots, 1 for LoRA slots


def stack_slots(modules: Sequence[ModuleAdapter], *, xp: Any = None) -> SlotStack:
    """Stack LoRA/DoRA modules of one layer into slots 0..S-1, zero-padded to the largest rank."""
    if not modules:
        raise ConfigError("a slot stack needs at least one adapter")
    for j, m in enumerate(modules):
        if m.method not in SLOT_METHODS or m.fan_in_fan_out:
            raise ConfigError(f"slot {j}: only LoRA and DoRA modules in (out, in) layout stack into slots, "
                              f"got {m.method}" + (" with fan_in_fan_out" if m.fan_in_fan_out else ""))
    xp = xp or namespace(modules[0].A)
    k, d = modules[0].A.shape[1], modules[0].B.shape[0]
    if any(m.A.shape[1] != k or m.B.shape[0] != d for m in modules):
        raise ShapeError(f"every slot must adapt the same ({d}, {k}) layer, got "
                         f"{[(m.B.shape[0], m.A.shape[1]) for m in modules]}")
    r_max = max(m.r for m in modules)
    dtype = modules[0].A.dtype
    A = [xp.concat([m.A, xp.zeros((r_max - m.r, k), dtype=dtype)], axis=0) for m in modules]
    B = [xp.concat([m.B, xp.zeros((d, r_max - m.r), dtype=dtype)], axis=1) for m in modules]
    dora = any(m.spec.rescaled for m in modules)
    magnitude = xp.stack([m.magnitude if m.spec.rescaled else xp.zeros((d,), dtype=dtype) for m in modules]) \
        if dora else None
    return SlotStack(A=xp.stack(A), B=xp.stack(B), magnitude=magnitude, scalings=tuple(m.scaling for m in modules),
                     ranks=tuple(m.r for m in modules), methods=tuple(m.method for m in modules))


def check_slot_stack(slots: SlotStack, *, d: int, k: int) -> None:
    """Shapes, methods, ranks, and zeros in every padded entry (a kernel would multiply them)."""
    xp = namespace(slots.A, slots.B, slots.magnitude)
    S = len(slots.ranks)
    if not (len(slots.scalings) == len(slots.methods) == S >= 1):
        raise ConfigError(f"a slot stack needs one rank, scaling and method per slot, got {len(slots.ranks)}, "
                          f"{len(slots.scalings)}, {len(slots.methods)}")
    r_max = max(slots.ranks)
    check_float_array("A_stack", slots.A, xp=xp, shape=(S, r_max, k))
    check_float_array("B_stack", slots.B, xp=xp, shape=(S, d, r_max))
    for j, (r, method) in enumerate(zip(slots.ranks, slots.methods)):
        if method not in SLOT_METHODS:
            raise ConfigError(f"slot {j}: method {method!r}; a slot holds one of {', '.join(SLOT_METHODS)}")
        if not 1 <= r <= r_max:
            raise ConfigError(f"slot {j}: rank {r} outside [1, {r_max}]")
        if bool(xp.any(slots.A[j, r:, :] != 0)) or bool(xp.any(slots.B[j, :, r:] != 0)):
            raise ConfigError(f"slot {j} (rank {r}): the padding beyond its rank must be zero")
    if any(method_spec(method).rescaled for method in slots.methods):
        if slots.magnitude is None:
            raise ConfigError("DoRA slots need the stacked magnitude (S, d)")
        check_float_array("magnitude", slots.magnitude, xp=xp, shape=(S, d))


def segment_token_slots(segment_starts: Any, segment_slots: Any, n: int) -> Any:
    """SGMV's segments as BGMV's per-token slots: t_i = segment_slots[p] for starts[p] <= i < starts[p+1]."""
    xp = namespace(segment_starts, segment_slots)
    q = segment_slots.shape[0]
    if len(segment_slots.shape) != 1 or tuple(segment_starts.shape) != (q + 1,):
        raise ShapeError(f"segment_starts must be (q+1,) for q segment_slots, got {tuple(segment_starts.shape)} "
                         f"and {tuple(segment_slots.shape)}")
    starts = [int(v) for v in segment_starts]
    if starts[0] != 0 or starts[-1] != n or any(b < a for a, b in zip(starts, starts[1:])):
        raise InputError(f"segment_starts must rise from 0 to the {n} tokens, got {starts}")
    lengths = [b - a for a, b in zip(starts, starts[1:])]
    return xp.concat([xp.full((length,), int(slot), dtype=xp.int64) for length, slot in zip(lengths, segment_slots)]) \
        if q else xp.zeros((0,), dtype=xp.int64)


def _check_token_slots(token_slots: Any, n: int, S: int) -> list[int]:
    if tuple(token_slots.shape) != (n,):
        raise ShapeError(f"token_slots has shape {tuple(token_slots.shape)}, expected one slot per token ({n},)")
    values = [int(v) for v in token_slots]
    bad = [i for i, v in enumerate(values) if not NO_ADAPTER <= v < S]
    if bad:
        raise InputError(f"token_slots[{bad[0]}] = {values[bad[0]]}: a slot must be -1 (no adapter) or in [0, {S})")
    return values


def _groups(values: list[int], S: int) -> list[tuple[int, list[int]]]:
    """(slot, its token rows) for each slot in use, the no-adapter rows first."""
    return [(j, [i for i, v in enumerate(values) if v == j]) for j in range(NO_ADAPTER, S) if j in values]


def _scatter(blocks: list[tuple[list[int], Any]], n: int, *, xp: Any) -> Any:
    """Rows of each block put back at their token positions: concatenate, then undo the sort."""
    order = [i for token_rows, _ in blocks for i in token_rows]
    inverse = [0] * n
    for position, i in enumerate(order):
        inverse[i] = position
    stacked = xp.concat([values for _, values in blocks], axis=0)
    return xp.take(stacked, xp.asarray(inverse, dtype=xp.int64), axis=0)


def mixed_forward(x: Any, W0: Any, slots: SlotStack, token_slots: Any, *, bias: Any = None) -> BatchOutput:
    """y, shrink, expand (n, ...) of a mixed batch in the BGMV layout (module docstring); x is (n, k)."""
    xp = namespace(x, W0, bias, slots.A, slots.B, slots.magnitude)
    if len(x.shape) != 2 or len(W0.shape) != 2 or x.shape[1] != W0.shape[1]:
        raise ShapeError(f"x must be (n, k) and W0 (d, k), got {tuple(x.shape)} and {tuple(W0.shape)}")
    n, (d, k) = x.shape[0], W0.shape
    check_slot_stack(slots, d=d, k=k)
    S, r_max = len(slots.ranks), max(slots.ranks)
    y_blocks, shrink_blocks, expand_blocks = [], [], []
    for j, token_rows in _groups(_check_token_slots(token_slots, n, S), S):
        xj = xp.take(x, xp.asarray(token_rows, dtype=xp.int64), axis=0)              # (n_j, k)
        if j == NO_ADAPTER:
            y_blocks.append((token_rows, base_forward(xj, W0, bias, fan_in_fan_out=False, xp=xp)))
            zeros = xp.zeros((len(token_rows), r_max), dtype=x.dtype)
            shrink_blocks.append((token_rows, zeros))
            expand_blocks.append((token_rows, xp.zeros((len(token_rows), d), dtype=x.dtype)))
            continue
        A, B = slots.factors(j)
        if method_spec(slots.methods[j]).rescaled:
            yj, cache = dora_forward(xj, W0, A, B, slots.magnitude[j, :], scaling=slots.scalings[j], bias=bias)
        else:
            yj, cache = lora_forward(xj, W0, A, B, scaling=slots.scalings[j], bias=bias)
        pad = xp.zeros((len(token_rows), r_max - slots.ranks[j]), dtype=x.dtype)
        y_blocks.append((token_rows, yj))
        shrink_blocks.append((token_rows, xp.concat([cache.xa, pad], axis=1)))
        expand_blocks.append((token_rows, xp.matmul(cache.xa, xp.matrix_transpose(B)) * slots.scalings[j]))
    return BatchOutput(y=_scatter(y_blocks, n, xp=xp), shrink=_scatter(shrink_blocks, n, xp=xp),
                       expand=_scatter(expand_blocks, n, xp=xp), dora_scale=_dora_scales(W0, slots, xp=xp))


def _dora_scales(W0: Any, slots: SlotStack, *, xp: Any) -> Any:
    """g_j = m_j / nu_j per DoRA slot (dora_forward's own, read from its cache), 1 for LoRA slots."""
    d = W0.shape[0]
    probe = W0[:1, :] * 0                                  # one zero token, in W0's array type
    scales = []
    for j, method in enumerate(slots.methods):
        if not method_spec(method).rescaled:
            scales.append(xp.ones((d,), dtype=W0.dtype))
            continue
        A, B = slots.factors(j)
        _, cache = dora_forward(probe, W0, A, B, slots.magnitude[j, :], scaling=slots.scalings[j])
        scales.append(cache.magnitude / cache.weight_norm)
    return xp.stack(scales)


# --- error bounds (composed from refpeft.tolerance's algebra; docs/tolerance.md) ---------------


def mixed_forward_bound(x: Any, W0: Any, slots: SlotStack, token_slots: Any, *, bias: Any = None,
                        dtype: str = "float32", accumulation: str | None = None,
                        model: str = "rigorous") -> dict[str, Any]:
    """Per-element bounds on y, shrink, expand and dora_scale of `mixed_forward` in `dtype`.

    Each token's rows follow its slot's own chain (LoRA's or DoRA's, which bound the peer's order
    and refpeft's); expand is s_j (shrink B_j^T) with shrink's error carried in. A kernel that keeps
    its shrink in float32 for half inputs is more accurate than the bound assumes (each result
    rounded to the half format), so the same bound covers it.
    """
    n, (d, k) = x.shape[0], W0.shape
    check_slot_stack(slots, d=d, k=k)
    S, r_max = len(slots.ranks), max(slots.ranks)
    groups = _groups(_check_token_slots(token_slots, n, S), S)
    xp = namespace(x, W0)

    def chain(p: Precision) -> dict[str, Bounded]:
        blocks: dict[str, list[tuple[list[int], Bounded]]] = {"y": [], "shrink": [], "expand": []}
        for j, token_rows in groups:
            xj = xp.take(x, xp.asarray(token_rows, dtype=xp.int64), axis=0)
            if j == NO_ADAPTER:
                blocks["y"].append((token_rows, matmul(rows(exact(xj)), transpose(exact(W0)), p,
                                                      bias=exact_or_none(bias))))
                blocks["shrink"].append((token_rows, exact(xp.zeros((len(token_rows), r_max), dtype=xp.float64))))
                blocks["expand"].append((token_rows, exact(xp.zeros((len(token_rows), d), dtype=xp.float64))))
                continue
            A, B = slots.factors(j)
            s = slots.scalings[j]
            if method_spec(slots.methods[j]).rescaled:
                c = dora_error_chain(xj, W0, A, B, slots.magnitude[j, :], scaling=s, bias=bias, dropout_mask=None,
                                     fan_in_fan_out=False, p=p)
            else:
                c = lora_error_chain(xj, W0, A, B, scaling=s, bias=bias, dropout_mask=None, fan_in_fan_out=False,
                                     precision=p)
            pad = xp.zeros((len(token_rows), r_max - slots.ranks[j]), dtype=xp.float64)
            blocks["y"].append((token_rows, c["y"]))
            blocks["shrink"].append((token_rows, Bounded(xp.concat([c["xa"].value, pad], axis=1),
                                                         xp.concat([c["xa"].error, pad], axis=1))))
            blocks["expand"].append((token_rows, matmul(c["xa"], transpose(exact(B)), p, scale=s)))
        out = {name: _scatter_bounded(b, n, xp=xp) for name, b in blocks.items()}
        out["dora_scale"] = _scale_chain(W0, slots, p, xp=xp)
        return out

    return with_reference(chain, Precision(dtype, accumulation, model))


def _scatter_bounded(blocks: list[tuple[list[int], Bounded]], n: int, *, xp: Any) -> Bounded:
    pick: Callable[[str], Any] = lambda part: _scatter([(r, getattr(b, part)) for r, b in blocks], n, xp=xp)  # noqa: E731
    return Bounded(pick("value"), pick("error"))


def _scale_chain(W0: Any, slots: SlotStack, p: Precision, *, xp: Any) -> Bounded:
    """g_j's error per DoRA slot (DoRA's chain on one zero token: only g is read), 0 for LoRA slots."""
    d = W0.shape[0]
    values, errors = [], []
    for j, method in enumerate(slots.methods):
        if not method_spec(method).rescaled:
            values.append(xp.ones((d,), dtype=xp.float64))
            errors.append(xp.zeros((d,), dtype=xp.float64))
            continue
        A, B = slots.factors(j)
        g = dora_error_chain(W0[:1, :] * 0, W0, A, B, slots.magnitude[j, :],
                             scaling=slots.scalings[j], bias=None, dropout_mask=None, fan_in_fan_out=False, p=p)["g"]
        values.append(g.value)
        errors.append(g.error)
    return Bounded(xp.stack(values), xp.stack(errors))
