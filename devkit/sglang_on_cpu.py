"""How SGLang runs on these CPUs: the engine settings a CPU needs (float32 to compare with
transformers exactly), also passed to the demo's language pods (`make demo
DEMO_BACKEND=sglang`, whose CPU test image has the kernel stand-ins built in); and for
processes on this machine (tests, benchmarks), its virtualenv (hack/sglang-env.sh) and
the stand-in for its kernel package (devkit/sglang_cpu, first on PYTHONPATH)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SGLANG_PYTHON = str(REPO / ".venv-sglang" / "bin" / "python")
SGLANG_ENV = {
    "PYTHONPATH": str(REPO / "devkit" / "sglang_cpu"),
    "SGLANG_USE_CPU_ENGINE": "1",
}
SGLANG_CPU_ARGS = (
    "--device", "cpu", "--attention-backend", "torch_native", "--disable-overlap-schedule",
    "--max-total-tokens", "4096", "--mem-fraction-static", "0.05", "--dtype", "float32",
)  # fmt: skip
