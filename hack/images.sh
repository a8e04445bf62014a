#!/usr/bin/env bash
# The local cluster's images, built without a Docker daemon or a registry:
#   - a base made from Debian packages (mmdebstrap; Python, PyTorch and the RDMA libraries
#     from Debian, so that no CUDA wheel is downloaded), passed to the Dockerfile as its
#     PYTHON_IMAGE and CUDA_IMAGE build arguments (whose defaults stay the public images);
#   - both targets of the project's Dockerfile, built by buildah (chroot isolation);
#   - the node's sandbox ("pause") image: Debian's static busybox, sleeping.
# Cached by content: the base by its package list, the project's images by the files they
# are built from, so that an unchanged tree builds nothing. Storage lives in the user's
# cache directory; images reach the node's containerd as archives.
#   hack/images.sh tag                  the content tag of the project's images
#   hack/images.sh build                build what is missing; print the two image names
#   hack/images.sh pause                print the path of the pause image's archive
#   hack/images.sh archive IMAGE        print the path of IMAGE's archive (built if missing)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/deepstack-disagg/images"
buildah=(buildah --root "$cache/storage" --runroot "$cache/run" --storage-driver overlay)
export TMPDIR="$cache/tmp"  # buildah's temporary files and RUN cache mounts (pip's cache)

BASE_SUITE=trixie
# Debian packages of the two bases: Python for the wheel and operator stages; for the
# runtime, PyTorch (CPU) and the RDMA libraries too. The Dockerfile installs into a
# virtualenv that sees the system's packages, so Debian's torch satisfies `torch>=2.4`
# and no CUDA wheel is downloaded. `passwd` for the Dockerfile's useradd.
PYTHON_PACKAGES=python3,python3-venv,ca-certificates,passwd
RUNTIME_PACKAGES=$PYTHON_PACKAGES,python3-torch,libibverbs1,librdmacm1,libnuma1,ibverbs-providers,libcurl4t64

log() { printf '[images] %s\n' "$*" >&2; }

exists() { "${buildah[@]}" inspect --type image "$1" >/dev/null 2>&1; }

base() { # what packages
  local key name ctr rootfs
  key="$(printf '%s\n' "$BASE_SUITE" "$2" | sha256sum | cut -c1-12)"
  name="localhost/deepstack-base-$1:$key"
  if ! exists "$name"; then
    log "making $name from Debian $BASE_SUITE packages"
    rootfs="$cache/base-$key.tar"
    mmdebstrap --quiet --variant=minbase --include="$2" \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' --format=tar \
      "$BASE_SUITE" "$rootfs.tmp" >&2
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
    -type f -not -path '*/__pycache__/*' -not -path '*.egg-info/*' -print0 |
    LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-12)
}

build() {
  local t target name host_ca=/etc/ssl/certs/ca-certificates.crt python_base runtime_base
  t="$(tag)"
  for target in operator runtime; do
    name="localhost/deepstack-$target:$t"
    if exists "$name"; then echo "$name"; continue; fi
    python_base="$(base python "$PYTHON_PACKAGES")"
    runtime_base="$(base runtime "$RUNTIME_PACKAGES")"
    log "building $name"
    # The build trusts what this machine trusts (a proxy's CA, for example).
    (cd "$root" && "${buildah[@]}" build --quiet --isolation chroot --layers \
      --volume "$host_ca:/etc/ssl/certs/ca-certificates.crt:ro" \
      --target "$target" --tag "$name" \
      --build-arg "PYTHON_IMAGE=$python_base" --build-arg "CUDA_IMAGE=$runtime_base" \
      --build-arg "RUNTIME_EXTRAS=runtime,cpu" \
      --file Dockerfile . >&2)
    echo "$name"
  done
  prune "$t"
}

# Only the newest build is kept: older tags, their dangling layers and archives go.
prune() { # tag to keep
  local image
  for image in $("${buildah[@]}" images --format '{{.Name}}:{{.Tag}}' --filter reference='localhost/deepstack-operator' --filter reference='localhost/deepstack-runtime' 2>/dev/null); do
    [[ "$image" == *":$1" ]] || "${buildah[@]}" rmi "$image" >/dev/null 2>&1 || true
  done
  "${buildah[@]}" rmi --prune >/dev/null 2>&1 || true
  find "$cache/archives" -name 'localhost_deepstack-*.tar' ! -name "*_$1.tar" \
    ! -name 'localhost_deepstack-pause_*' -delete 2>/dev/null || true
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
  pause) pause ;;
  archive) exists "$2" || build >/dev/null; archive "$2" ;;
  *) echo "usage: $0 tag|build|pause|archive IMAGE" >&2; exit 2 ;;
esac
