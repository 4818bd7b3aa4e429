#!/usr/bin/env bash
# The GPU check of issue 18, as one prepared script for a bare CUDA machine (Python, torch and CuPy present,
# no network): run from the repository root as
#     OUT=/path/to/results bash benchmarks/gpu_check.sh [WHEEL_DIR]
# WHEEL_DIR holds wheels for what the machine lacks (installed offline, --no-deps); whatever is still
# missing afterwards is reported with the size of its wheel, if given, and its checks are skipped by
# name. Everything lands in $OUT (default ./gpu_check_out):
#   gpu.txt        the GPU (nvidia-smi) and the versions of torch, CuPy, ONNX Runtime, PEFT
#   missing.txt    modules refpeft's checks import that are not importable, after installing
#   tests.log      the test suite; CuPy joins the backend list by itself when it sees a GPU
#                  (tests/support.py), and the CUDA execution-provider export tests run when
#                  onnxruntime-gpu sees it (tests/test_export_verify.py)
#   bench_gpu.log  NF4 dequantise bandwidth in CuPy, LoRA step CuPy vs PEFT on torch CUDA (benchmarks/bench_gpu.py)
#   summary.txt    one line per step with its exit status
# Each step has its own time limit (seconds): GPU_CHECK_TEST_SECONDS (default 420), and 120 for the
# benchmark; GPU_CHECK_TESTS narrows the test run (pytest arguments; default: the whole suite).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check_out}"
wheels="${1:-}"
mkdir -p "$out"
: > "$out/summary.txt"

step() {  # step NAME LOGFILE SECONDS COMMAND...: run, log, record the status
    local name=$1 log=$2 seconds=$3
    shift 3
    local started=$SECONDS
    timeout "$seconds" "$@" > "$out/$log" 2>&1
    local status=$?
    echo "$name: exit $status in $((SECONDS - started)) s (log $log)" | tee -a "$out/summary.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "nvidia-smi: not available"
  python - <<'EOF'
import importlib
for name in ("torch", "cupy", "onnxruntime", "peft", "transformers", "bitsandbytes"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as exc:
        print(name, "not importable:", type(exc).__name__, exc)
try:
    import torch
    print("torch.cuda.is_available():", torch.cuda.is_available())
except Exception:
    pass
EOF
} > "$out/gpu.txt" 2>&1

if [ -n "$wheels" ] && ls "$wheels"/*.whl > /dev/null 2>&1; then
    step "install wheels from $wheels" install.log 300 python -m pip install --no-index --no-deps "$wheels"/*.whl
fi
step "install refpeft (no dependencies, no network)" install_refpeft.log 300 \
    python -m pip install --no-index --no-deps --no-build-isolation -e .

python - "$wheels" > "$out/missing.txt" 2>&1 <<'EOF'
import importlib, pathlib, sys
wheels = pathlib.Path(sys.argv[1]) if sys.argv[1] else None
needed = ("numpy", "scipy", "safetensors", "ml_dtypes", "array_api_compat", "tokenizers", "gguf", "jinja2", "regex",
          "tqdm", "hypothesis", "pytest", "array_api_strict", "onnx", "onnxruntime", "onnxruntime_genai", "onnx_ir",
          "torch", "peft", "transformers", "bitsandbytes", "cupy")
for name in needed:
    try:
        importlib.import_module(name)
    except Exception as exc:
        sizes = [f"{w.name} {w.stat().st_size / 2**20:.1f} MiB" for w in (wheels.glob(f"{name.replace('_', '*')}*.whl")
                 if wheels else [])]
        print(f"{name}: not importable ({type(exc).__name__}: {exc})" + (f"; wheel given: {', '.join(sizes)}" if sizes else
              "; no wheel given"))
EOF
echo "missing after install: $(grep -c "not importable" "$out/missing.txt") module(s) (missing.txt)" | tee -a "$out/summary.txt"

# The suite: peers that are missing here skip with their reason (no REFPEFT_REQUIRE_PEERS: this machine
# lacks some by design, and missing.txt says which).
# shellcheck disable=SC2086
step "tests (CuPy backend, CUDA execution provider)" tests.log "${GPU_CHECK_TEST_SECONDS:-420}" \
    python -m pytest -q -p no:cacheprovider -rs ${GPU_CHECK_TESTS:-}
tail -n 3 "$out/tests.log" | tee -a "$out/summary.txt"
step "benchmarks (CuPy NF4 bandwidth, LoRA step vs PEFT on CUDA)" bench_gpu.log 120 python benchmarks/bench_gpu.py
cat "$out/bench_gpu.log" >> "$out/summary.txt"
