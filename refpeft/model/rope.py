"""Rotary position embedding (Su et al. 2021, RoFormer) as transformers applies it to Llama models.

Inverse frequencies, for a head dimension D (even) and base theta (config `rope_theta`):

    inv[i] = 1 / theta^(2i / D)                          # (D/2,)   rope_type "default"

rope_type "llama3" (Llama 3.1; transformers' `_compute_llama3_parameters`) rescales them by
wavelength lambda = 2 pi / inv, with L = original_max_position_embeddings, f = factor,
lo = low_freq_factor, hi = high_freq_factor:

    lambda < L / hi            inv                              high frequencies: unchanged
    lambda > L / lo            inv / f                          low frequencies: interpolated
    otherwise                  (1 - m) inv / f + m inv,  m = (L / lambda - lo) / (hi - lo)

Both types have attention_scaling 1.0, so the tables are plain cosines and sines. Tables, for
integer position ids p (b, s) given by the caller (transformers uses 0..s-1 plus the cache length,
whatever the padding, unless the caller passes position_ids):

    freqs = p[..., None] * inv                          # (b, s, D/2)
    emb   = concat(freqs, freqs)                        # (b, s, D)
    cos, sin = cos(emb), sin(emb)                       # (b, s, D)

Forward on x (b, heads, s, D), with R the `rotate_half` map R(x) = concat(-x2, x1) over the two
halves x1, x2 of the last axis (transformers' convention; cos and sin broadcast over heads):

    y = x * cos + R(x) * sin                            # (b, heads, s, D)

Backward, for dy = dL/dy: R is linear with transpose R^T(z) = concat(z2, -z1) = -R(z), so

    dx = dy * cos + R^T(dy * sin)                       # (b, heads, s, D)

Because emb repeats freqs, sin has equal halves and R^T(dy * sin) = -R(dy) * sin: dx is dy rotated
by -theta (cos(-t) = cos t, sin(-t) = -sin t), the inverse rotation, as an orthogonal map's
transpose must be. The code uses the first form, exact for any tables.

Precision: transformers computes inv (modeling_rope_utils.py) and the tables (modeling_llama.py,
LlamaRotaryEmbedding.forward: `position_ids[..., None].float() * self.inv_freq ...float()`) in
float32 and casts cos/sin to the activations' dtype; here they are computed in the dtype asked for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from refpeft.backend import check_float_array, float_dtype, namespace, numpy_namespace, same_dtype
from refpeft.errors import ConfigError, ShapeError
from refpeft.model.checks import require_integer

ROPE_TYPES = ("default", "llama3")


def rope_inverse_frequencies(head_dim: int, *, rope_theta: float, rope_type: str = "default",
                             factor: float | None = None, low_freq_factor: float | None = None,
                             high_freq_factor: float | None = None,
                             original_max_position_embeddings: int | None = None,
                             dtype: str = "float64", xp: Any = None) -> Any:
    """inv (head_dim / 2,) for rope_type "default" or "llama3" (keyword names as in rope_parameters)."""
    xp = numpy_namespace() if xp is None else xp
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"unknown rope_type {rope_type!r}; choose one of {', '.join(ROPE_TYPES)}")
    if head_dim < 2 or head_dim % 2:
        raise ConfigError(f"head_dim must be a positive even number, got {head_dim}")
    if not rope_theta > 0.0:
        raise ConfigError(f"rope_theta must be positive, got {rope_theta}")
    dt = float_dtype(dtype, xp=xp)
    exponent = xp.arange(0, head_dim, 2, dtype=dt) / head_dim                      # (D/2,)  2i / D
    inv = 1.0 / (rope_theta ** exponent)                                            # (D/2,)
    if rope_type == "default":
        return inv
    _check_llama3(factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * math.pi / inv                                                     # (D/2,)
    scaled = xp.where(wavelen > low_wavelen, inv / factor, inv)                     # low frequencies / f
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled                     # the medium band
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return xp.where(medium, smoothed, scaled)


def rope_tables(position_ids: Any, inv_freq: Any) -> tuple[Any, Any]:
    """cos, sin (b, s, D) of the angles p * inv for integer position ids (b, s), in inv_freq's dtype."""
    xp = namespace(position_ids, inv_freq)
    require_integer("position_ids", position_ids, xp=xp, ndim=2)
    check_float_array("inv_freq", inv_freq, xp=xp)
    if len(inv_freq.shape) != 1:
        raise ShapeError(f"inv_freq has shape {tuple(inv_freq.shape)}, expected (head_dim / 2,)")
    freqs = xp.astype(position_ids, inv_freq.dtype)[..., None] * inv_freq          # (b, s, D/2)
    emb = xp.concat([freqs, freqs], axis=-1)                                        # (b, s, D)
    return xp.cos(emb), xp.sin(emb)


@dataclass(frozen=True)
class RopeCache:
    """What `rope_backward` needs: the tables, already broadcast over heads."""

    cos: Any    # (b, 1, s, D)
    sin: Any    # (b, 1, s, D)
    shape: tuple[int, ...]  # x's shape (b, heads, s, D)


def rope_forward(x: Any, cos: Any, sin: Any) -> tuple[Any, RopeCache]:
    """y = x cos + rotate_half(x) sin for x (b, heads, s, D) and tables (b or 1, s, D)."""
    xp = namespace(x, cos, sin)
    for name, a in (("x", x), ("cos", cos), ("sin", sin)):
        check_float_array(name, a, xp=xp)
    same_dtype({"x": x, "cos": cos, "sin": sin})
    _check_tables(x, cos, sin)
    c, s = cos[:, None, ...], sin[:, None, ...]                                     # (b, 1, s, D)
    y = x * c + _rotate_half(x, xp=xp) * s                                          # (b, heads, s, D)
    return y, RopeCache(cos=c, sin=s, shape=tuple(x.shape))


def rope_backward(dy: Any, cache: RopeCache) -> Any:
    """dx = dy cos + rotate_half^T(dy sin), the rotation by -theta; see the module docstring."""
    xp = namespace(dy, cache.cos)
    check_float_array("dy", dy, xp=xp, shape=cache.shape)
    return dy * cache.cos + _rotate_half_transpose(dy * cache.sin, xp=xp)


def _rotate_half(x: Any, *, xp: Any) -> Any:
    """R(x) = concat(-x2, x1) over the halves of the last axis (transformers' `rotate_half`)."""
    half = x.shape[-1] // 2
    return xp.concat([-x[..., half:], x[..., :half]], axis=-1)


def _rotate_half_transpose(z: Any, *, xp: Any) -> Any:
    """R^T(z) = concat(z2, -z1), the adjoint of `_rotate_half`."""
    half = z.shape[-1] // 2
    return xp.concat([z[..., half:], -z[..., :half]], axis=-1)


def _check_tables(x: Any, cos: Any, sin: Any) -> None:
    if len(x.shape) != 4:
        raise ShapeError(f"x has shape {tuple(x.shape)}, expected (batch, heads, seq, head_dim)")
    b, _, s, d = x.shape
    if d % 2:
        raise ShapeError(f"x has an odd head_dim {d}; rotate_half needs two equal halves")
    if tuple(cos.shape) != tuple(sin.shape):
        raise ShapeError(f"cos has shape {tuple(cos.shape)} but sin has {tuple(sin.shape)}")
    if len(cos.shape) != 3 or cos.shape[0] not in (1, b) or tuple(cos.shape[1:]) != (s, d):
        raise ShapeError(f"cos/sin have shape {tuple(cos.shape)}, expected ({b} or 1, {s}, {d}) for x of shape "
                         f"{tuple(x.shape)}")


def _check_llama3(factor: Any, low: Any, high: Any, original: Any) -> None:
    named = {"factor": factor, "low_freq_factor": low, "high_freq_factor": high,
             "original_max_position_embeddings": original}
    missing = [n for n, v in named.items() if v is None]
    if missing:
        raise ConfigError(f"rope_type 'llama3' needs {', '.join(missing)}")
    if not all(v > 0 for v in named.values()):
        raise ConfigError(f"llama3 rope parameters must be positive, got {named}")
    if not high > low:
        raise ConfigError(f"high_freq_factor ({high}) must exceed low_freq_factor ({low})")
