"""PEFT's `modules_to_save`: whole base modules trained in full, how entries select them, and their file keys.

PEFT (peft.utils.other: `_set_trainable`, `ModulesToSaveWrapper`) wraps every module of the base
model whose name ends with an entry of `modules_to_save`, by a plain string test
(`name.endswith(entry)`: "norm" selects "model.norm" and every "input_layernorm" too). The wrapper
holds a deep copy of the module; the copy is trained and used in forward, the original is frozen.
`save_pretrained` writes each of the copy's tensors under the wrapped module's name, which is the
base checkpoint's own name for that tensor behind PEFT's prefix:

    base_model.model.<module>.<tensor>     base_model.model.lm_head.weight,
                                           base_model.model.model.embed_tokens.weight, ...

refpeft keeps the copies as `Adapter.saved_modules`, keyed by that checkpoint name
("lm_head.weight"). The decoder uses them instead of the base's tensors and trains them
(refpeft.model.decoder); `merge` writes them into the merged checkpoint, as PEFT's
`merge_and_unload` keeps the trained copies.

Matching. Every dotted prefix of a tensor name is the name of a module of the model, so the module
PEFT wrapped for a tensor is the outermost prefix ending with an entry (`saved_module`: an entry
"mlp" wraps "model.layers.0.mlp" and saves its three projections). Reading refuses a key that no
entry selects (a saved module the config does not name) and an entry that selects no key (a named
module with no tensors); training applies the same rule to the model's tensor names. Writing
names each saved tensor's own module by its full path ("lm_head", "model.norm"); `check_entries`
confirms against a model that each such entry ends no other module's name, so PEFT wraps exactly those.

PEFT never adapts a module that `modules_to_save` selects, by a second rule
(tuners_utils.check_target_module_exists): `re.match(rf"(^|.*\\.){entry}($|\\..*)", path)`, the entry
a regular expression over whole path components (`excluded_from_targets`). refpeft refuses a
module that is both adapted and saved rather than dropping the adapter silently.

Tied embeddings (tie_word_embeddings with PEFT's default ensure_weight_tying=False): the deep copy
of a tied lm_head is a tensor of its own, so a saved "lm_head.weight" is a trained head that no
longer follows the embedding; a saved "model.embed_tokens.weight" trains the input embedding while
the head keeps multiplying by the frozen base embedding. ensure_weight_tying=True (one copy shared
by both, with both keys saved) is refused by refpeft.peft_config.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from refpeft.errors import ConfigError, FormatError, ShapeError
from refpeft.patterns import check_pattern, matches

KEY_PREFIX = "base_model.model."     # as refpeft.peft_format.PREFIX
TIED_HEAD, EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"


def module_names(tensor_names: Iterable[str]) -> set[str]:
    """Every module name the tensors imply: each proper dotted prefix ("model", "model.norm", ...)."""
    names = set()
    for name in tensor_names:
        parts = name.split(".")
        names.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return names


def saved_module(name: str, entries: Sequence[str]) -> str | None:
    """The module PEFT wraps for tensor `name`: its outermost dotted prefix that ends with an entry, or None."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        if any(prefix.endswith(entry) for entry in entries):
            return prefix
    return None


def select_saved(tensor_names: Iterable[str], entries: Sequence[str], *, where: str) -> dict[str, str]:
    """{tensor name: its wrapped module} for the tensors the entries select; every entry must select one.

    `where` starts the error message (a file, or "modules_to_save")."""
    selected = {name: module for name in tensor_names if (module := saved_module(name, entries)) is not None}
    matched = module_names(selected)
    for entry in entries:
        if not any(m.endswith(entry) for m in matched):
            raise ConfigError(f"{where}: modules_to_save entry {entry!r} selects no module with tensors "
                              f"(PEFT wraps each module whose name ends with {entry!r})")
    return selected


def excluded_from_targets(path: str, entries: Sequence[str]) -> bool:
    """Whether PEFT leaves module `path` unadapted because `modules_to_save` selects it (module docstring)."""
    return any(matches(_saved_pattern(entry), path, mode="match", where=f"modules_to_save entry {entry!r}")
               for entry in entries)


def _saved_pattern(entry: str) -> str:
    """The regular expression PEFT matches a modules_to_save entry as, against target modules."""
    return rf"(^|.*\.){entry}($|\..*)"


def written_entries(saved: Mapping[str, Any]) -> list[str]:
    """The modules_to_save refpeft writes: each saved tensor's own module, by full path, sorted."""
    return sorted({name.rpartition(".")[0] for name in saved})


def check_saved_entries(entries: Any, *, where: str) -> None:
    """An adapter_config.json's modules_to_save: a list of non-empty strings, each usable as PEFT's regex."""
    if not isinstance(entries, list) or not all(isinstance(e, str) and e for e in entries):
        raise ConfigError(f"{where}: modules_to_save must be a list of module names, got {entries!r}")
    for entry in entries:
        check_pattern(_saved_pattern(entry), where=f"{where}: modules_to_save entry {entry!r}, as PEFT matches it")


def check_adapter_saved(modules: Iterable[str], saved: Mapping[str, Any], base_biases: Mapping[str, Any], *,
                        source: Any) -> None:
    """Saved modules against the adapted modules and trained biases of the same adapter."""
    paths = written_entries(saved)
    for path in modules:
        if excluded_from_targets(path, paths):
            raise ConfigError(f"{source}: module {path!r} is adapted but also lies in a saved module "
                              f"(modules_to_save {paths}); PEFT adapts no module it saves in full")
    for path in base_biases:
        if f"{path}.bias" in saved:
            raise ConfigError(f"{source}: {KEY_PREFIX}{path}.bias is both a trained bias and a saved module's tensor")


def check_saved_against_base(saved: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], *,
                             source: Any) -> None:
    """Each saved tensor is a base tensor of the same shape, and each saved module has all its tensors.

    shapes: every base tensor by checkpoint name, with "lm_head.weight" included for a tied head
    (PEFT saves a tied lm_head's own copy)."""
    for name, value in saved.items():
        if name not in shapes:
            raise ShapeError(f"{source}: {KEY_PREFIX}{name} is a saved module's tensor, but the base model has no "
                             f"tensor {name!r}")
        if tuple(value.shape) != tuple(shapes[name]):
            raise ShapeError(f"{source}: {KEY_PREFIX}{name} has shape {tuple(value.shape)}, the base's {name!r} "
                             f"{tuple(shapes[name])}")
    for module in written_entries(saved):
        missing = sorted(n for n in shapes if n.startswith(module + ".") and n not in saved)
        if missing:
            raise FormatError(f"{source}: saved module {module!r} lacks {', '.join(KEY_PREFIX + n for n in missing)} "
                              "(PEFT saves every tensor of a module in modules_to_save)")


def check_entries(entries: Sequence[str], tensor_names: Iterable[str]) -> None:
    """Each written entry selects exactly its own module among the model's modules under PEFT's endswith rule."""
    names = module_names(tensor_names)
    for entry in entries:
        others = sorted(m for m in names if m != entry and m.endswith(entry))
        if others:
            raise ConfigError(f"modules_to_save entry {entry!r} would also select {others[:3]} in PEFT "
                              "(it wraps every module whose name ends with the entry)")


__all__ = ["saved_module", "select_saved", "excluded_from_targets", "written_entries", "check_saved_entries",
           "check_adapter_saved", "check_saved_against_base", "check_entries", "module_names"]
