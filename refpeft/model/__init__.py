"""The ops of a Llama-family decoder, each a pure forward/backward pair in the array API.

Module map: `embedding` (token lookup and its scatter-add gradient), `rmsnorm` (LlamaRMSNorm, also
Qwen3's per-head q/k norm), `rope` (inverse frequencies for rope_type "default" and "llama3", the
cos/sin tables, and the rotate_half rotation), `attention` (causal grouped-query attention with a
padding mask and a KV-cache offset, as transformers' eager attention), `mlp` (the SwiGLU gate
silu(gate) * up between the MLP's projections), `loss` (transformers' shifted causal-LM
cross-entropy), and `checks` (boundary checks of integer inputs). Every op is `X_forward(...) ->
(out, cache)` and `X_backward(dout, cache) -> grads`; linear layers, adapted or not, live elsewhere,
and a model module composes these ops. The derivations are in each module's docstring and in
docs/model_ops.md. Loading a model lives beside them: `config` (the decoder's shape from
config.json), `weights` (a model folder, one tensor at a time), `gguf_file` (a GGUF file), `load`
(one entry point for either) and `tokenizer`.
"""
