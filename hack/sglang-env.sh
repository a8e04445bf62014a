#!/usr/bin/env bash
# A separate virtualenv with SGLang 0.5.23's Python code but none of its GPU
# dependencies, so CPU tests can run SGLang's own server-argument parser and its
# EncoderBootstrapServer against what the launcher renders. Kept apart from .venv:
# SGLang pins a torch that the runtime does not use. Idempotent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv-sglang"
stamp="$venv/.installed-sglang-0.5.23-v1"
[[ -f "$stamp" ]] && exit 0
python3 -m venv "$venv"
pip=("$venv/bin/pip" install --quiet --disable-pip-version-check)
"${pip[@]}" --no-deps "sglang==0.5.23"
torch_version="$("$root/.venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')"
# What `sglang.srt.server_args` and `sglang.srt.disaggregation.encoder.receiver` import.
"${pip[@]}" "torch==$torch_version" torchvision numpy packaging pillow pydantic tqdm psutil \
  orjson pybase64 requests aiohttp starlette msgspec pyzmq ipython fastapi uvicorn \
  transformers dill apache-tvm-ffi sentencepiece compressed-tensors gguf openai \
  partial-json-parser
touch "$stamp"
