"""refpeft_onnx: export refpeft adapters to ONNX, verified against refpeft before anything is written.

    stack     the model exported: a stack of (adapted) linear layers with activations, and its
              float64 reference forward (refpeft's own LoRA/DoRA/VeRA forward per layer)
    graph     build_model: merged and unmerged (swappable adapter inputs) graphs, float32/float16
    nf4       NF4 frozen weights: com.microsoft.MatMulBnb4 or standard ops, ~4.127 bits/parameter
    adapter_files   .onnx_adapter files (onnxruntime.AdapterFormat) for the unmerged graph's inputs
    serving   AdapterSession: one ONNX Runtime session, the active adapter chosen per run
    verify    onnx.checker (full shape inference) + ONNX Runtime against the reference within the
              derived float32/float16 bound (refpeft.tolerance); save_verified refuses failing graphs
    demo      export_and_check: what `refpeft demo` calls at its end

The refpeft core never imports this package (nor onnx); install the `onnx` extra to use it.
"""

import importlib.util


def missing_extra() -> str | None:
    """None when the `onnx` extra (onnx, onnxruntime, scipy) is importable, else what to install.

    Importing `refpeft_onnx` itself needs neither, so callers (the demo, the CLI) can ask first.
    """
    missing = [m for m in ("onnx", "onnxruntime", "scipy") if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return (f"the `onnx` extra is not installed (missing {', '.join(missing)}; "
            "pip install 'refpeft[onnx]')")
