"""How SGLang runs on these CPUs, for the tests and `make demo DEMO_BACKEND=sglang`: its
virtualenv (hack/sglang-env.sh), the stand-in for its kernel package
(devkit/sglang_cpu, first on PYTHONPATH), and the engine settings a CPU needs
(float32 to compare with transformers exactly)."""

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
