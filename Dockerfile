# syntax=docker/dockerfile:1.7
# Two images from one file:
#   docker build --target operator -t deepstack-operator:0.1.0 .
#   docker build --target runtime  -t deepstack-runtime:0.1.0 .
# `hack/images.sh` builds them without a Docker daemon, from bases made from Debian
# packages (PYTHON_IMAGE, RUNTIME_IMAGE): the GPU runtime as it is here, and a CPU runtime
# with RUNTIME_EXTRAS=runtime,cpu.
# Python packages go into a virtualenv at /opt/deepstack: never over the distribution's.
# No CUDA base image: the CUDA libraries come as the wheels torch and SGLang depend on;
# the host gives the driver (NVIDIA container toolkit) and any RDMA devices.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
# Debian 12's Python 3.11: SGLang's structured-output dependency has no 3.13 wheel.
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ---- wheel: build the project's wheel once --------------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY runtime ./runtime
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /opt/build \
    && /opt/build/bin/pip wheel --no-deps --wheel-dir /dist .

# ---- operator: slim Python with kopf and the Kubernetes client -------------------------
FROM ${PYTHON_IMAGE} AS operator
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/deepstack/bin:$PATH
COPY --from=wheel /dist /dist
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /opt/deepstack \
    && pip install "$(ls /dist/*.whl)[operator]" \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin deepstack
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["deepstack-operator"]

# ---- runtime: SGLang with its CUDA wheels, the CUDA 13 build of Mooncake (the only one:
# every build ships the same module) with the RDMA user-space libraries -----------------
FROM ${RUNTIME_IMAGE} AS runtime
# runtime,sglang: GPU pods; runtime,cpu: the reference backend on CPU (no CUDA).
ARG RUNTIME_EXTRAS=runtime,sglang
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/deepstack/bin:$PATH
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv libibverbs1 librdmacm1 libnuma1 ibverbs-providers libcurl4 \
    && rm -rf /var/lib/apt/lists/*
# The virtualenv sees the system's packages: a base that ships PyTorch keeps it.
COPY --from=wheel /dist /dist
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv --system-site-packages /opt/deepstack \
    && pip install "$(ls /dist/*.whl)[${RUNTIME_EXTRAS}]" \
    && pip check \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin deepstack
# Caches under $HOME (torch's compiler, Triton, FlashInfer): in a pod the root filesystem
# is read-only and /tmp an emptyDir. What a CUDA base image would set for the NVIDIA
# container toolkit: the driver's compute libraries, where some installers mount them.
ENV HOME=/tmp NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LD_LIBRARY_PATH=/usr/local/nvidia/lib64
USER 10001:10001
EXPOSE 8000 9090
ENTRYPOINT ["deepstack-runtime"]
