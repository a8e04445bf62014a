"""The sglang backend's encode side on a GPU (run by hack/gpu-check.sh on a machine with one
NVIDIA GPU; SGLang itself cannot be installed there):

1. the vision tower on CUDA in bfloat16 against the same tower on CPU in float32;
2. one item with resumption between two processes over Mooncake (tcp), with the GPU
   image's Mooncake build (its CUDA 13 build, `.cache/gpu-wheels`): the buffers must be
   registered in device memory, and the received item must equal what was sent, bit for
   bit.
Prints one JSON line per check; exits non-zero when a check fails.
`--device cpu` runs the same checks without a GPU (to try the script itself).
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def mooncake_build() -> str:
    """The installed distribution that ships the `mooncake` module."""
    import importlib.metadata

    for dist in importlib.metadata.distributions():
        if any(str(f).startswith("mooncake/") for f in dist.files or ()):
            return f"{dist.metadata['Name']}=={dist.version}"
    return "none"


def main(device_name: str) -> int:
    from deepstack_runtime.backends.reference import ReferenceEncoder
    from deepstack_runtime.buffers import BufferLayout
    from deepstack_runtime.models.tiny import make_tiny_model
    from deepstack_runtime.transfer.mooncake import buffer_device
    from deepstack_runtime.transfer.settings import TransferSettings
    from devkit.oracles import ReferencePreprocessor
    from devkit.runtime import png
    from devkit.transfer_peers import Peer, decode_item, encode_item

    assert device_name == "cpu" or torch.cuda.is_available(), "no CUDA device"
    model = make_tiny_model(Path(tempfile.mkdtemp()) / "model")
    pre = ReferencePreprocessor(model)
    image = Image.open(io.BytesIO(png(96, 64, (30, 120, 200)))).convert("RGB")
    prompt = pre.prepare([{"role": "user", "content": [{"type": "image"}]}], [image])
    assert prompt.pixel_values is not None
    assert prompt.image_grid_thw is not None
    cpu = ReferenceEncoder(model).encode(prompt.pixel_values, prompt.image_grid_thw)
    encoder = ReferenceEncoder(model, device=device_name, dtype=torch.bfloat16)
    encoder.encode(prompt.pixel_values, prompt.image_grid_thw)  # warm-up
    if device_name != "cpu":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    gpu = encoder.encode(prompt.pixel_values, prompt.image_grid_thw)
    if device_name != "cpu":
        torch.cuda.synchronize()
    encode_ms = (time.perf_counter() - t0) * 1e3
    ok = True
    for name in ("embeddings", "deepstack"):
        want, got = getattr(cpu, name), getattr(gpu, name).float().cpu()
        rel = float((got - want).norm() / want.norm())
        passed = rel < 2e-2  # bfloat16 keeps 8 bits of mantissa
        ok &= passed
        print(json.dumps({"check": f"vision_{name}_bf16_vs_cpu_fp32", "relative_error": rel,
                          "passed": passed, "encode_ms": round(encode_ms, 2)}))  # fmt: skip

    device = buffer_device()
    tokens = gpu.num_tokens
    layout = BufferLayout(64, 4, gpu.embeddings.shape[1], gpu.deepstack.shape[1], "bfloat16")  # type: ignore[union-attr]
    settings = TransferSettings(default_tokens=4, checksum=True)
    with Peer("sender", layout, settings, device=device) as sender, \
            Peer("receiver", layout, settings, device=device) as receiver:  # fmt: skip
        sent = sender.send("submit", "gpu-check", encode_item(gpu))
        got = receiver.call("receive", "gpu-check", sender.address, timeout=120)
        assert sender.result(sent)[0] == "ok"
        state = receiver.state()
    passed = got[0] == "ok"
    if passed:
        item = decode_item(got[1])
        passed = all(
            torch.equal(getattr(item, n).cpu(), getattr(gpu, n).cpu())
            for n in ("embeddings", "deepstack", "fill_ids", "positions")
        )
    resumptions = "deepstack_transfer_resumptions_total 1.0" in state["metrics"]
    on_device = device.startswith("cuda") or device_name == "cpu"
    ok &= passed and resumptions and on_device
    print(json.dumps({"check": "transfer_with_resumption", "buffers": device, "tokens": tokens,
                      "mooncake": mooncake_build(), "bit_exact": passed,
                      "resumed": resumptions}))  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cuda"))
