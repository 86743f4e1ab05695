# Engine with the torch runner on NVIDIA GPUs: <registry>/engine-torch-cuda.
# The torch wheel from PyPI brings its CUDA libraries; the CUDA base image sets what the
# NVIDIA container toolkit needs to mount the driver.
# Build from the repository root:
#   docker build -f docker/engine-torch-cuda.Dockerfile -t ghcr.io/modelfleet/engine-torch-cuda:0.1.0 .
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

FROM ${CUDA_IMAGE}
ARG TORCH_VERSION=2.15.0
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/modelfleet \
    && /opt/modelfleet/bin/pip install --no-cache-dir "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY dataplane ./dataplane
RUN /opt/modelfleet/bin/pip install --no-cache-dir ".[torch]" \
    && rm -rf /src \
    && groupadd --gid 10001 modelfleet \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin modelfleet \
    && mkdir -p /cache && chown 10001:10001 /cache
WORKDIR /
ENV PATH=/opt/modelfleet/bin:$PATH \
    HOME=/tmp \
    MODELFLEET_CACHE=/cache \
    HF_HUB_OFFLINE=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
ENTRYPOINT ["modelfleet"]
CMD ["engine", "--help"]
