# syntax=docker/dockerfile:1.7
# Two images from one file:
#   docker build --target operator -t deepstack-operator:0.1.0 .
#   docker build --target runtime  -t deepstack-runtime:0.1.0 .

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# ---- wheel: build the project's wheel once --------------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
RUN pip install --no-cache-dir build==1.2.2.post1
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY runtime ./runtime
RUN python -m build --wheel --outdir /dist

# ---- operator: slim Python with kopf and the Kubernetes client -------------------------
FROM ${PYTHON_IMAGE} AS operator
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=wheel /dist /dist
RUN pip install --no-cache-dir "$(ls /dist/*.whl)[operator]" && rm -rf /dist \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin deepstack
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["deepstack-operator"]

# ---- runtime: CUDA, SGLang, the CUDA build of Mooncake (the only one: both builds ship the
# same module) with the RDMA user-space libraries --------------------------------------
FROM ${CUDA_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_BREAK_SYSTEM_PACKAGES=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-pip libibverbs1 librdmacm1 libnuma1 ibverbs-providers \
    && rm -rf /var/lib/apt/lists/*
COPY --from=wheel /dist /dist
RUN pip3 install --no-cache-dir "$(ls /dist/*.whl)[runtime,sglang]" && rm -rf /dist \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin deepstack
USER 10001:10001
EXPOSE 8000 9090
ENTRYPOINT ["deepstack-runtime"]
