# Engine with the torch runner on NVIDIA GPUs: <registry>/engine-torch-cuda.
# The torch wheel from PyPI brings its CUDA libraries; the CUDA base image sets what the
# NVIDIA container toolkit needs to mount the driver.
# Build from the repository root:
#   docker build -f docker/engine-torch-cuda.Dockerfile -t ghcr.io/modelfleet/engine-torch-cuda:0.1.0 .
# Installs exactly uv.lock (the [torch] extra); see docker/README.md.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

FROM ${CUDA_IMAGE}
ARG UV_VERSION=0.13.8
# uv.lock is made for CPython 3.11 (the base image's python3 is 3.12): uv installs a 3.11
# under /opt/python for the venv; the system python3 only carries uv.
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_PROJECT_ENVIRONMENT=/opt/modelfleet \
    UV_PYTHON=3.11 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv  \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/uv \
    && /opt/uv/bin/pip install --no-cache-dir "uv==${UV_VERSION}" \
    && /opt/uv/bin/uv python install 3.11
WORKDIR /src
# the dependencies in a layer of their own: a source change rebuilds only the last one
COPY pyproject.toml uv.lock README.md ./
RUN /opt/uv/bin/uv sync --locked --no-install-project --no-editable --extra torch
COPY operator ./operator
COPY dataplane ./dataplane
RUN /opt/uv/bin/uv sync --locked --no-editable --extra torch \
    && rm -rf /src /opt/uv \
    && groupadd --gid 10001 modelfleet \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin modelfleet \
    && mkdir -p /cache && chown 10001:10001 /cache
WORKDIR /
ENV PATH=/opt/modelfleet/bin:$PATH \
    HOME=/tmp \
    MODELFLEET_CACHE=/cache \
    HF_HUB_OFFLINE=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONSAFEPATH=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
ENTRYPOINT ["modelfleet"]
CMD ["engine", "--help"]
