"""SGLang's own Qwen3-VL vision tower on this CPU, for comparing the encode server with it:
loads the checkpoint the way SGLang's encoder-only server does (its MMEncoder) and writes
the fused [tokens, hidden x (1 + K)] rows for the given pixels.

    python -m tests.support.sglang_vision MODEL_DIR INPUTS.pt OUTPUT.pt   (.venv-sglang)
"""

from __future__ import annotations

import socket
import sys

import torch


def main(model_dir: str, inputs: str, output: str) -> None:
    from sglang.srt.disaggregation.encoder.server import MMEncoder
    from sglang.srt.managers.schedule_batch import MultimodalDataItem
    from sglang.srt.multimodal.modality import Modality
    from sglang.srt.runtime_context import publish
    from sglang.srt.server_args import prepare_server_args

    from devkit.sglang_on_cpu import SGLANG_CPU_ARGS

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = prepare_server_args(
        ["--model-path", model_dir, "--encoder-only",
         "--encoder-transfer-backend", "zmq_to_scheduler", *SGLANG_CPU_ARGS]
    )  # fmt: skip
    publish(args, role="encoder")  # as SGLang's encoder process entry does
    encoder = MMEncoder(args, dist_init_method=f"tcp://127.0.0.1:{port}")
    given = torch.load(inputs)
    item = MultimodalDataItem(
        modality=Modality.IMAGE,
        feature=given["pixels"],
        model_specific_data={"image_grid_thw": given["grid"]},
    )
    with torch.inference_mode():
        fused = encoder.model.get_image_feature([item])
    torch.save(fused.float().cpu(), output)


if __name__ == "__main__":
    main(*sys.argv[1:4])
