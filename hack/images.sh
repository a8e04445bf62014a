#!/usr/bin/env bash
# The images, built without a Docker daemon or a registry:
#   - bases made from Debian packages (mmdebstrap), passed to the Dockerfile as its
#     PYTHON_IMAGE and RUNTIME_IMAGE build arguments (whose defaults stay the public images);
#   - the project's Dockerfile, built by buildah (chroot isolation): the operator; the CPU
#     runtime the local node runs (RUNTIME_EXTRAS=runtime,cpu, on Debian 13 with its
#     PyTorch); the GPU runtime as it is shipped (runtime,sglang, on Debian 12);
#   - the sglang backend's CPU test image (devkit/sglang-cpu-test.Containerfile): the CPU
#     runtime plus SGLang and its test-only kernel stand-ins;
#   - the node's sandbox ("pause") image: Debian's static busybox, sleeping.
# Cached by content: a base by its package list, the others by the files they are built
# from, so that an unchanged tree builds nothing. Storage lives in the user's cache
# directory; images reach the node's containerd as archives.
#   hack/images.sh tag                  the content tag of the project's images
#   hack/images.sh build                build what is missing; print the operator, runtime
#                                       and sglang test image names
#   hack/images.sh gpu                  build the GPU runtime image; print its name
#   hack/images.sh gpu-check [--if-changed]
#                                       build the GPU runtime image, check it inside (no GPU
#                                       needed) and write the record hack/gpu-image.checked;
#                                       --if-changed: only when the record is not of the
#                                       GPU image's current inputs
#   hack/images.sh gpu-inputs           the digest of what the GPU image's contents follow from
#   hack/images.sh pause                print the path of the pause image's archive
#   hack/images.sh archive IMAGE        print the path of IMAGE's archive (built if missing)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/deepstack-disagg/images"
buildah=(buildah --root "$cache/storage" --runroot "$cache/run" --storage-driver overlay)
export TMPDIR="$cache/tmp"  # buildah's temporary files and RUN cache mounts (pip's cache)
record="$root/hack/gpu-image.checked"

# Debian packages of the bases: Python for the wheel and operator stages; for the CPU
# runtime, PyTorch and the RDMA libraries too. The Dockerfile installs into a virtualenv
# that sees the system's packages. `passwd` for the Dockerfile's useradd. The GPU runtime
# gets Debian 12's Python 3.11 (SGLang's dependencies have no 3.13 build of everything)
# and its CUDA libraries as wheels.
BASE_SUITE=trixie
GPU_SUITE=bookworm
PYTHON_PACKAGES=python3,python3-venv,ca-certificates,passwd
RUNTIME_PACKAGES=$PYTHON_PACKAGES,python3-torch,libibverbs1,librdmacm1,libnuma1,ibverbs-providers,libcurl4t64
CPU_EXTRAS=runtime,cpu
GPU_EXTRAS=runtime,sglang

log() { printf '[images] %s\n' "$*" >&2; }

exists() { "${buildah[@]}" inspect --type image "$1" >/dev/null 2>&1; }

base() { # name suite packages
  local key name ctr rootfs
  key="$(printf '%s\n' "$2" "$3" | sha256sum | cut -c1-12)"
  name="localhost/deepstack-base-$1:$key"
  if ! exists "$name"; then
    log "making $name from Debian $2 packages"
    rootfs="$cache/base-$key.tar"
    mmdebstrap --quiet --variant=minbase --include="$3" \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' --format=tar \
      "$2" "$rootfs.tmp" >&2
    ctr="$("${buildah[@]}" from scratch)"
    "${buildah[@]}" add "$ctr" "$rootfs.tmp" / >&2
    "${buildah[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      --cmd /bin/bash "$ctr"
    "${buildah[@]}" commit --quiet --rm "$ctr" "$name" >/dev/null
    rm -f "$rootfs.tmp"
  fi
  echo "$name"
}

# The files the project's images are built from (the build context, as .dockerignore
# leaves it), hashed by content: an edit, staged or not, makes a new tag.
tag() {
  (cd "$root" && find Dockerfile .dockerignore pyproject.toml README.md hack/images.sh operator runtime \
    "$@" -type f -not -path '*/__pycache__/*' -not -path '*.egg-info/*' -print0 |
    LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-12)
}
sglang_test_tag() { tag devkit/sglang-cpu-test.Containerfile devkit/sglang-cpu-requirements.txt devkit/sglang_cpu; }

dockerfile() { # image target|"" runtime-base extras [file]
  local host_ca=/etc/ssl/certs/ca-certificates.crt started=$SECONDS target=() python_base
  [[ -n "$2" ]] && target=(--target "$2")
  python_base="$(base python "$BASE_SUITE" "$PYTHON_PACKAGES")"
  log "building $1"
  # The build trusts what this machine trusts (a proxy's CA, for example).
  (cd "$root" && "${buildah[@]}" build --quiet --isolation chroot --layers \
    --volume "$host_ca:/etc/ssl/certs/ca-certificates.crt:ro" \
    "${target[@]}" --tag "$1" \
    --build-arg "PYTHON_IMAGE=$python_base" \
    --build-arg "RUNTIME_IMAGE=$3" --build-arg "RUNTIME_EXTRAS=$4" \
    --file "${5:-Dockerfile}" . >/dev/null)
  log "built $1 in $((SECONDS - started)) s"
}

build() {
  local t operator runtime runtime_base sglang_test
  t="$(tag)"
  operator="localhost/deepstack-operator:$t"
  runtime="localhost/deepstack-runtime:$t"
  sglang_test="localhost/deepstack-sglang-cpu-test:$(sglang_test_tag)"
  runtime_base="$(base runtime "$BASE_SUITE" "$RUNTIME_PACKAGES")"
  exists "$operator" || dockerfile "$operator" operator "$runtime_base" "$CPU_EXTRAS"
  exists "$runtime" || dockerfile "$runtime" runtime "$runtime_base" "$CPU_EXTRAS"
  exists "$sglang_test" ||
    dockerfile "$sglang_test" "" "$runtime" "" devkit/sglang-cpu-test.Containerfile
  printf '%s\n' "$operator" "$runtime" "$sglang_test"
  prune "$sglang_test" "$runtime" "$operator"  # an image before the one it is built on
}

gpu() {
  local name gpu_base
  name="localhost/deepstack-runtime-gpu:$(tag)"
  if ! exists "$name"; then
    gpu_base="$(base gpu "$GPU_SUITE" "$PYTHON_PACKAGES")"
    dockerfile "$name" runtime "$gpu_base" "$GPU_EXTRAS"
    prune_older "$name"
  fi
  echo "$name"
}

# What the GPU image's contents follow from, beside the project's own Python code (which
# the CPU images run in every test): the Dockerfile, the dependencies it installs and the
# base it starts from.
gpu_inputs() {
  {
    cat "$root/Dockerfile"
    printf '%s\n' "$GPU_SUITE" "$PYTHON_PACKAGES" "$GPU_EXTRAS"
    python3 -c 'import sys, tomllib, json
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
extras = {e: project["optional-dependencies"][e] for e in sys.argv[2].split(",")}
print(json.dumps([project["dependencies"], extras], sort_keys=True))' "$root/pyproject.toml" "$GPU_EXTRAS"
    cat "$root/hack/gpu_image_check.py"
  } | sha256sum | cut -c1-12
}

# The driver's libcuda.so.1 comes from the host; without a GPU the check loads this
# stand-in instead: each driver API function (`cuXxx`, unversioned: a versioned name is
# another library's) that a library of the image (ROOTFS) linking libcuda.so.1 imports,
# answering CUDA_ERROR_NO_DEVICE (100).
driver_stand_in() { # rootfs dir
  find "$1/opt/deepstack" -name '*.so*' -type f -print0 |
    xargs -0 -r sh -c 'for f; do
      readelf -d "$f" 2>/dev/null | grep -q "Shared library: \[libcuda\.so\.1\]" &&
        nm -D --undefined-only "$f"; done; true' sh |
    awk '$NF ~ /^cu[A-Z][A-Za-z0-9_]*$/ { print "int " $NF "(void) { return 100; }" }' |
    sort -u >"$2/stand-in.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$2/libcuda.so.1" "$2/stand-in.c"
  chmod -R a+rX "$2"  # the image's user reads it
  log "driver stand-in: $(wc -l <"$2/stand-in.c") functions"
}

# Globals, for the EXIT trap: the check's working container and stand-in directory.
check_ctr="" check_stand_in=""
cleanup_check() {
  [[ -z "$check_ctr" ]] || "${buildah[@]}" rm "$check_ctr" >/dev/null
  [[ -z "$check_stand_in" ]] || rm -rf "$check_stand_in"
}

gpu_check() {
  local inputs name started=$SECONDS
  inputs="$(gpu_inputs)"
  if [[ "${1:-}" == --if-changed ]] && grep -qx "inputs $inputs" "$record" 2>/dev/null; then
    log "the GPU image's inputs are those of its record ($inputs): not rebuilt"
    return
  fi
  name="$(gpu)"
  trap cleanup_check EXIT
  check_ctr="$("${buildah[@]}" from --quiet "$name")"
  check_stand_in="$(mktemp -d)"
  driver_stand_in "$("${buildah[@]}" mount "$check_ctr")" "$check_stand_in"
  # The lines go to the terminal too: a failed check shows there, and no record is written.
  {
    echo "# Written by \`hack/images.sh gpu-check\`: the GPU runtime image, built here from the"
    echo "# inputs below and checked inside by hack/gpu_image_check.py. \`make test\` rebuilds and"
    echo "# rechecks it whenever these inputs change (hack/images.sh gpu-inputs)."
    echo "inputs $inputs"
    echo "size $("${buildah[@]}" images --format '{{.Size}}' "$name")"
    "${buildah[@]}" run --volume "$root/hack/gpu_image_check.py:/tmp/gpu_image_check.py:ro" \
      --volume "$check_stand_in:/opt/driver-stand-in:ro" "$check_ctr" -- \
      python3 /tmp/gpu_image_check.py
  } | tee "$record.tmp" >&2
  mv "$record.tmp" "$record"
  log "checked $name in $((SECONDS - started)) s: $record"
}

# Only the newest build of each is kept: older tags, their dangling layers and archives go.
prune() { # images to keep
  local image
  for image in "$@"; do prune_older "$image"; done
  "${buildah[@]}" rmi --prune >/dev/null 2>&1 || true
}

prune_older() { # image: the other tags of its name go, with their archives
  local other archive
  for other in $("${buildah[@]}" images --format '{{.Name}}:{{.Tag}}' --filter reference="${1%:*}" 2>/dev/null); do
    [[ "$other" == "$1" ]] || "${buildah[@]}" rmi "$other" >/dev/null 2>&1 || true
  done
  archive="$(printf '%s' "$1" | tr '/:' '__')"
  find "$cache/archives" -name "${archive%_*}_*.tar" ! -name "$archive.tar" -delete 2>/dev/null || true
}

archive() { # image
  local file
  file="$cache/archives/$(printf '%s' "$1" | tr '/:' '__').tar"
  if [[ ! -f "$file" ]]; then
    mkdir -p "$cache/archives"
    "${buildah[@]}" push --quiet "$1" "docker-archive:$file.tmp:$1" >&2
    mv "$file.tmp" "$file"
  fi
  echo "$file"
}

pause() {
  local name=localhost/deepstack-pause:1 ctr
  if ! exists "$name"; then
    ctr="$("${buildah[@]}" from scratch)"
    "${buildah[@]}" copy "$ctr" /bin/busybox /busybox >&2
    "${buildah[@]}" config --entrypoint '["/busybox", "sleep", "2147483647"]' "$ctr"
    "${buildah[@]}" commit --quiet --rm "$ctr" "$name" >/dev/null
  fi
  archive "$name"
}

mkdir -p "$cache" "$TMPDIR"
case "${1:-}" in
  tag) tag ;;
  build) build ;;
  gpu) gpu ;;
  gpu-check) gpu_check "${2:-}" ;;
  gpu-inputs) gpu_inputs ;;
  pause) pause ;;
  archive) exists "$2" || build >/dev/null; archive "$2" ;;
  *) echo "usage: $0 tag|build|gpu|gpu-check [--if-changed]|gpu-inputs|pause|archive IMAGE" >&2; exit 2 ;;
esac
