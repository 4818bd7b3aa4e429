"""The methods: one module each (its math, then its row of the method table), and the table itself.

    linear.py   the frozen linear layer every method sits on (layout, checks, x W0^T + b)
    spec.py     `Method`: what the rest of refpeft reads about a method
    lora.py     LoRA and rsLoRA            dora.py   DoRA (detached and exact norm gradient)
    vera.py     VeRA                        qlora.py  LoRA/DoRA on a frozen NF4/FP4 base
    ia3.py      (IA)^3: a learned vector scales a layer's outputs or inputs
    loha.py     LoHa (Hadamard product)     lokr.py   LoKr (Kronecker product)
    lora_init.py  PiSSA, OLoRA, LoftQ (inits that rewrite the base) and their rank-2r conversion
    oft.py      OFT: block-diagonal Cayley rotation of the input (Neumann and exact variants); oft_bounds.py its bounds
    boft.py     BOFT: a butterfly product of block-diagonal Cayley rotations, and an output scale
    prediag.py  Pre-Diag: diag(D) W0 + s B A   sora.py  SORA: diag(s) R W0 + s B A  (refpeft-only: peft_type None)
    bottleneck.py  Houlsby / Pfeiffer bottleneck adapters: a residual-stream module, not a linear layer's, so
                no row here (model-level, like prompt tuning: refpeft.model.bottleneck_adapters)

`METHODS` maps a method's name to its row. File formats, checkpoint merging, fusion, the
exporter, the conformance families, the model and the demo look a method up here instead of
comparing names; `register_method` adds one (docs/adding_a_method.md walks through it).
"""

from __future__ import annotations

from refpeft.errors import ConfigError
from refpeft.methods.boft import BOFT
from refpeft.methods.dora import DORA
from refpeft.methods.ia3 import IA3
from refpeft.methods.loha import LOHA
from refpeft.methods.lokr import LOKR
from refpeft.methods.lora import LORA
from refpeft.methods.oft import OFT
from refpeft.methods.prediag import PREDIAG
from refpeft.methods.sora import SORA
from refpeft.methods.spec import Method
from refpeft.methods.vera import VERA

METHODS: dict[str, Method] = {m.name: m for m in (LORA, DORA, VERA, IA3, LOHA, LOKR, OFT, BOFT, PREDIAG, SORA)}


def method_spec(name: str) -> Method:
    """The table row of method `name`; ConfigError naming the known methods otherwise."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; refpeft has {', '.join(METHODS)}")
    return METHODS[name]


def register_method(method: Method) -> Method:
    """Add a method to the table (a new name only); returns it, so a module can end with
    `TOY = register_method(Method(...))`."""
    if method.name in METHODS:
        raise ConfigError(f"a method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def peft_methods(peft_type: str) -> list[Method]:
    """The methods stored under one PEFT peft_type ("LORA": lora and dora), in table order."""
    return [m for m in METHODS.values() if m.peft_type == peft_type]
