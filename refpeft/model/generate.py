"""Text generation with a KV cache: greedy or sampled decoding, as transformers' `generate` computes it.

Letters: b prompts (batch), s the padded prompt length, V vocabulary, t the positions so far.

Why a cache is exact. The decoder is causal: layer l's hidden state at position j depends only on
the tokens at positions <= j, and so do its keys and values (k_j = rope(n_j W_k^T), v_j = n_j W_v^T,
n_j the normed state at j). Appending a token changes none of them, so each layer's (keys, values)
of the first t positions, computed once, are the ones a full pass over t + 1 tokens would compute;
the new position only adds its own query, key and value row:

    prefill:  logits, kv = forward(prompt (b, s), mask (b, s), positions (b, s))    # kv: (b, kvh, s, D)
              z = logits[:, -1]                                                    # (b, V) next-token logits
    step:     logits, kv = forward(token (b, 1), mask (b, t + 1), position (b, 1), past=kv)
              z = logits[:, -1]                                     # equals the last row of a full pass

`forward` concatenates the past keys and values with the new ones and lets the new query see all of
them (refpeft.model.attention: queries are the last positions of the keys). tests/test_model_generate.py
checks the cached logits against recomputing the whole sequence at every step.

Positions and padding (transformers' `_prepare_position_ids_for_generation` and
`_update_model_kwargs_for_generation`). Prompts of different lengths are left-padded to s with the
pad id and masked out (mask 0); a prompt's positions count its real tokens only:

    position[b, j] = cumsum(mask[b])_j - 1, and 0 on padding;   each step: last position + 1

so a padded prompt sees exactly the positions, keys and values it would see alone.

Prompt learning (PEFT's PeftModelForCausalLM.prepare_inputs_for_generation), k virtual tokens:

    prompt tuning, P-tuning:  prefill runs on concat(P, embed(ids)) (b, k + s) with mask concat(1 (b, k), mask);
                              PEFT drops position_ids, so the model numbers 0 .. k + s - 1 and each step
                              the cache's length, whatever the padding (a padded row's real tokens sit
                              later than they would alone)
    prefix tuning:            the prefix is every layer's initial cache (refpeft.model.prefix_tuning), the
                              mask gains k ones in front, and the positions above are shifted by k

and every step after the prefill is the plain cached step, the state's mask holding the k ones.
PEFT 0.21.2's own generate does not do this under transformers 5.24, whose models take the cache
as `cache` where PEFT still reads and writes `past_key_values`: it re-injects the virtual tokens at
every step and drops a prefix. The tests take PEFT's forward on the whole sequence at every step
as the peer (tests/test_prompt_tuning.py, tests/test_prefix_tuning.py).

Choosing the next token, from z (b, V), in the order of transformers' `_get_logits_processor`:

    greedy:       next = argmax_v z_v                        (the first index on ties, as torch.argmax)
    temperature:  z = z / T                                  (TemperatureLogitsWarper; none at T = 1)
    top-k:        z_v = -inf where z_v < the k-th largest z  (TopKLogitsWarper: ties at the cut stay;
                                                              none at k = 0)
    top-p:        sort z ascending, c = cumsum(softmax(sorted z)); drop the sorted entries with
                  c <= 1 - top_p, never the last (largest) one    (TopPLogitsWarper, min_tokens_to_keep 1;
                  none at top_p = 1)
    sample:       p = softmax(z); draw u ~ U[0, 1) from the numpy Generator; next = the smallest v
                  with C_v > u C_V, C = cumsum(p)            (inverse-CDF sampling: token v with
                                                              probability p_v; filtered tokens have
                                                              p_v = 0 and are never drawn)

transformers samples with torch.multinomial on torch's generator, so sampled tokens match it in
distribution, not draw for draw; the filtered distribution itself is its processors' (tested).
Ties at the top-p cut are broken by a stable ascending sort (torch.sort is not stable).

Stopping: a prompt is finished when it produces an eos id (its eos is kept in its output); finished
rows are fed the pad id until every row is finished or max_new_tokens are made (transformers'
`next_tokens * unfinished + pad * (1 - unfinished)`). pad defaults to the (first) eos id, as in
transformers.

Precision, and where transformers differs. The scores are the model's logits in its own dtype.
transformers casts the last row of logits to float32 before its processors
(`outputs.logits[:, -1].to(float32)`), so in float64 a greedy choice can differ from it only where
two logits lie within a float32 rounding of each other. Its sampling defaults, when a model's
generation_config sets none, are temperature 1, top_k 50, top_p 1
(`GenerationConfig._get_default_generation_params`); `Sampling()` here filters nothing, and
`refpeft generate` uses transformers' defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from refpeft.backend import namespace
from refpeft.errors import ConfigError, InputError
from refpeft.model.decoder import Model, forward
from refpeft.model.prompt_methods import virtual_tokens
from refpeft.model.prompt_tuning import prompt_mask


@dataclass(frozen=True)
class Sampling:
    """How to sample the next token: transformers' temperature, top_k (0: off) and top_p (1: off)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ConfigError(f"temperature must be a positive number, got {self.temperature!r} "
                              "(greedy decoding is sampling=None)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k must be an integer >= 0 (0 keeps every token), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 <= self.top_p <= 1.0):
            raise ConfigError(f"top_p must lie in [0, 1] (1 keeps every token), got {self.top_p!r}")


@dataclass(frozen=True)
class DecodeState:
    """What the next step needs: each layer's cached (keys, values), the mask so far, the last positions."""

    past: list          # per layer (keys, values), each (b, kv_heads, t, D), after rope
    mask: Any           # (b, t) 1 for a real token, 0 for left padding; None when nothing is padded
    last_position: Any  # (b, 1) the position of each row's last token


def generate(model: Model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: Sampling | None = None, rng: np.random.Generator | None = None,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None) -> list[list[int]]:
    """The new token ids of each prompt (a list of token-id lists), greedy when sampling is None.

    Each output ends at its first eos id (kept) or after max_new_tokens. Sampling draws one uniform
    per prompt per step from `rng`, which it requires (np.random.default_rng(seed)). The adapter,
    if any, is the model's (`Model(config, weights, adapter)`); see the module docstring.
    """
    xp = namespace(model.weights["model.embed_tokens.weight"])
    eos = _eos_ids(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if sampling is not None and rng is None:
        raise ConfigError("sampling needs an explicit random generator: rng=np.random.default_rng(seed)")
    ids, mask = _left_pad(prompts, pad=pad, max_positions=model.config.max_position_embeddings,
                          max_new_tokens=max_new_tokens, virtual=virtual_tokens(model), xp=xp, device=_device(model))
    outputs: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens == 0:
        return outputs
    z, state = prefill(model, ids, attention_mask=mask)
    finished = [False] * len(prompts)
    for step in range(max_new_tokens):
        chosen = _choose(z, sampling, rng, xp=xp)
        tokens = []
        for row, token in enumerate(chosen):
            if finished[row]:
                token = pad                                  # transformers' pad after a row's eos
            else:
                outputs[row].append(token)
                finished[row] = token in eos
            tokens.append(token)
        if all(finished) or step == max_new_tokens - 1:
            break
        z, state = decode_step(model, xp.asarray(tokens, dtype=xp.int64, device=_device(model)), state)
    return outputs


def prefill(model: Model, ids: Any, *, attention_mask: Any = None) -> tuple[Any, DecodeState]:
    """The next-token logits (b, V) of left-padded prompts ids (b, s), and the state to continue from.

    With prompt tuning's k virtual tokens (model.prompt) or a prefix (model.prefix) the state's mask
    gains k ones in front, as PEFT's prepare_inputs_for_generation puts them (module docstring)."""
    xp = namespace(ids)
    b, s = ids.shape
    k = virtual_tokens(model)
    if model.prompt is not None:                       # PEFT drops position_ids: 0 .. k + s - 1, padding or not
        logits, _, past = forward(model, ids, attention_mask=attention_mask, record=False)
        last = xp.full((b, 1), k + s - 1, dtype=xp.int64, device=ids.device)
        return logits[:, -1, :], DecodeState(past=past, mask=prompt_mask(attention_mask, k), last_position=last)
    if attention_mask is None:
        positions = xp.broadcast_to(xp.arange(s, dtype=xp.int64, device=ids.device)[None, :], (b, s))
    else:
        counted = xp.cumulative_sum(xp.astype(attention_mask, xp.int64), axis=1) - 1            # (b, s)
        positions = xp.where(attention_mask == 1, counted, xp.zeros_like(counted))
    # With a prefix, forward makes it the past, puts k ones in front of the mask and adds k to the positions.
    logits, _, past = forward(model, ids, attention_mask=attention_mask, position_ids=positions, record=False)
    mask = prompt_mask(attention_mask, k) if k else attention_mask
    return logits[:, -1, :], DecodeState(past=past, mask=mask, last_position=positions[:, -1:] + k)


def decode_step(model: Model, tokens: Any, state: DecodeState) -> tuple[Any, DecodeState]:
    """Feed one token per row (b,) after `state`: the next-token logits (b, V) and the new state."""
    xp = namespace(tokens)
    b = tokens.shape[0]
    mask = state.mask
    if mask is not None:
        mask = xp.concat([mask, xp.ones((b, 1), dtype=mask.dtype, device=tokens.device)], axis=1)   # (b, t + 1)
    position = state.last_position + 1                                                             # (b, 1)
    logits, _, past = forward(model, xp.reshape(tokens, (b, 1)), attention_mask=mask, position_ids=position,
                              past=state.past, record=False)
    return logits[:, -1, :], DecodeState(past=past, mask=mask, last_position=position)


def next_token_scores(z: Any, sampling: Sampling) -> Any:
    """transformers' temperature, top-k and top-p processors applied to logits z (b, V): filtered
    entries become -inf (module docstring)."""
    xp = namespace(z)
    vocab = z.shape[-1]
    minus_inf = xp.asarray(-xp.inf, dtype=z.dtype, device=z.device)
    if sampling.temperature != 1.0:
        z = z / sampling.temperature
    if sampling.top_k != 0:
        k = min(sampling.top_k, vocab)
        kth = xp.sort(z, axis=-1, descending=True)[:, k - 1:k]                                     # (b, 1)
        z = xp.where(z < kth, minus_inf, z)
    if sampling.top_p < 1.0:
        rows = []
        last = xp.arange(vocab, device=z.device) == vocab - 1                                      # (V,)
        for row in range(z.shape[0]):                       # one row at a time: no take_along_axis needed
            order = xp.argsort(z[row, :], stable=True)                                             # ascending
            cumulative = xp.cumulative_sum(_softmax(xp.take(z[row, :], order), xp=xp))             # (V,)
            drop_sorted = (cumulative <= 1.0 - sampling.top_p) & ~last                             # keep the largest
            drop = xp.take(drop_sorted, xp.argsort(order))                                         # back to vocab order
            rows.append(xp.where(drop, minus_inf, z[row, :]))
        z = xp.stack(rows, axis=0)
    return z


def sample_tokens(scores: Any, uniforms: Sequence[float]) -> list[int]:
    """Inverse-CDF draws from softmax(scores) (b, V), one uniform in [0, 1) per row."""
    xp = namespace(scores)
    cdf = xp.cumulative_sum(_softmax(scores, xp=xp), axis=-1)                                      # (b, V)
    tokens = []
    for row, u in enumerate(uniforms):
        below = int(xp.sum(xp.astype(cdf[row, :] <= float(u) * cdf[row, -1], xp.int64)))         # first C_v > u C_V
        tokens.append(min(below, int(xp.argmax(cdf[row, :]))))   # u C_V rounding up to C_V: the last kept token
    return tokens


def prompt_ids(tokenizer: Any, text: str, *, chat: bool | None = None) -> list[int]:
    """The token ids of `text`; with chat (default: when the tokenizer has a chat template) the text
    is a user message rendered by the template with the generation prompt, as transformers'
    `apply_chat_template(..., add_generation_prompt=True)`. A rendered template carries its own
    special tokens, so it is encoded without adding more (transformers' `tokenize=True` path)."""
    if chat is None:
        chat = tokenizer.chat_template is not None
    if not chat:
        return tokenizer.encode(text)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return tokenizer.encode(rendered, add_special_tokens=False)


# --- helpers ----------------------------------------------------------------------------------------


def _choose(z: Any, sampling: Sampling | None, rng: np.random.Generator | None, *, xp: Any) -> list[int]:
    if sampling is None:
        chosen = xp.argmax(z, axis=-1)                                                             # (b,)
        return [int(chosen[row]) for row in range(z.shape[0])]
    return sample_tokens(next_token_scores(z, sampling), rng.random(z.shape[0]))


def _softmax(z: Any, *, xp: Any) -> Any:
    e = xp.exp(z - xp.max(z, axis=-1, keepdims=True))       # -inf entries give exactly 0
    return e / xp.sum(e, axis=-1, keepdims=True)


def _left_pad(prompts: Sequence[Sequence[int]], *, pad: int, max_positions: int, max_new_tokens: int,
              virtual: int = 0, xp: Any, device: Any) -> tuple[Any, Any]:
    """ids (b, s) left-padded with `pad`, and the mask (b, s), or None when no prompt is padded."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise InputError("prompts must be a non-empty list of token-id lists")
    rows = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence) or \
                not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
            raise InputError(f"prompt {i} must be a list of token ids (ints), got {type(prompt).__name__}")
        if not prompt:
            raise InputError(f"prompt {i} is empty; generation continues a prompt of at least one token")
        rows.append([int(t) for t in prompt])
    s = max(len(r) for r in rows)
    after = f" after {virtual} virtual tokens" if virtual else ""
    if virtual + s > max_positions:
        raise InputError(f"the prompt has {s} tokens{after}, more than the model's max_position_embeddings "
                         f"({max_positions})")
    if virtual + s + max_new_tokens - 1 > max_positions:
        raise InputError(f"a {s}-token prompt{after} and max_new_tokens {max_new_tokens} need "
                         f"{virtual + s + max_new_tokens - 1} positions; the model has max_position_embeddings "
                         f"{max_positions}")
    ids = xp.asarray([[pad] * (s - len(r)) + r for r in rows], dtype=xp.int64, device=device)
    if all(len(r) == s for r in rows):
        return ids, None
    mask = xp.asarray([[0] * (s - len(r)) + [1] * len(r) for r in rows], dtype=xp.int64, device=device)
    return ids, mask


def _eos_ids(eos_token_id: int | Sequence[int] | None) -> tuple[int, ...]:
    if eos_token_id is None:
        return ()
    ids = (eos_token_id,) if isinstance(eos_token_id, (int, np.integer)) else tuple(eos_token_id)
    if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids):
        raise ConfigError(f"eos_token_id must be a token id or a list of them, got {eos_token_id!r}")
    return tuple(int(i) for i in ids)


def _device(model: Model) -> Any:
    return model.weights["model.embed_tokens.weight"].device
