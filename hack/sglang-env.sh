#!/usr/bin/env bash
# A virtualenv that runs SGLang 0.5.23 on CPU for the sglang backend's tests and benchmarks:
# SGLang's Python code without its GPU dependencies, what it imports on the serving path,
# and this project (editable, no dependencies). It is kept apart from .venv (SGLang's
# pins are not the runtime's) but reads torch, transformers and the rest from .venv
# through a .pth file, so the multi-GB torch install exists once. SGLang's kernel package
# is not installable on CPU: devkit/sglang_cpu stands in for it (PYTHONPATH).
# Idempotent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv-sglang"
requirements="$root/devkit/sglang-cpu-requirements.txt"
stamp="$venv/.installed-sglang-0.5.23-$(sha1sum "$requirements" | cut -c1-12)"
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
# What SGLang imports on the serving path (torch, transformers, numpy, pillow, pydantic,
# aiohttp ... come from .venv).
pip_install -r "$requirements" "torch==$torch_version"
pip_install --no-deps -e "$root"
touch "$stamp"
