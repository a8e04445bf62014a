#!/usr/bin/env bash
# A virtualenv with SGLang 0.5.23's Python code but none of its GPU dependencies,
# so CPU tests can run SGLang's own server-argument parser and its
# EncoderBootstrapServer against what the launcher renders. It is kept apart from
# .venv (SGLang's pins are not the runtime's) but reads torch, transformers and the
# rest from .venv through a .pth file, so the multi-GB torch install exists once.
# Idempotent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv-sglang"
stamp="$venv/.installed-sglang-0.5.23-v2"
[[ -f "$stamp" ]] && exit 0
rm -rf "$venv"
python3 -m venv "$venv"
site() { "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))'; }
# Appended after the venv's own site-packages: what is installed here wins.
site "$root/.venv" >"$(site "$venv")/deepstack-main-venv.pth"
pip_install() {
  # sglang is installed without its GPU pins, so pip's resolver lists them after
  # every install; they are expected and only hide real errors.
  "$venv/bin/pip" install --quiet --no-cache-dir --disable-pip-version-check "$@" \
    2> >(grep -v -e "^sglang 0.5.23 requires" -e "dependency resolver does not currently" >&2)
}
pip_install --no-deps "sglang==0.5.23"
torch_version="$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')"
# Pinning torch to the one .venv has (and pip sees through the .pth) makes pip pick
# the torchvision built for it instead of installing a second torch.
pip_install torchvision "torch==$torch_version"
# The rest of what `sglang.srt.server_args` and
# `sglang.srt.disaggregation.encoder.receiver` import (torch, transformers, numpy,
# pillow, pydantic, aiohttp ... come from .venv).
pip_install psutil orjson pybase64 starlette msgspec pyzmq ipython fastapi uvicorn \
  dill apache-tvm-ffi sentencepiece compressed-tensors gguf openai partial-json-parser
touch "$stamp"
