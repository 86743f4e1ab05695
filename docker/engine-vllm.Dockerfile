# Engine with the vLLM runner: <registry>/engine-vllm. The engine starts vLLM's own
# OpenAI server on a Unix socket and admits, queues and prioritises in front of it.
# Build from the repository root:
#   docker build -f docker/engine-vllm.Dockerfile -t ghcr.io/modelfleet/engine-vllm:0.1.0 .
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

FROM ${CUDA_IMAGE}
ARG VLLM_VERSION=0.33.0
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# gcc and the Python headers: Triton compiles its launchers at run time
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/modelfleet \
    && /opt/modelfleet/bin/pip install --no-cache-dir "vllm==${VLLM_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY dataplane ./dataplane
RUN /opt/modelfleet/bin/pip install --no-cache-dir . \
    && rm -rf /src \
    && groupadd --gid 10001 modelfleet \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin modelfleet \
    && mkdir -p /cache && chown 10001:10001 /cache
WORKDIR /
# vLLM, Triton and FlashInfer keep their caches under HOME (/tmp, an emptyDir in the pod)
ENV PATH=/opt/modelfleet/bin:$PATH \
    HOME=/tmp \
    MODELFLEET_CACHE=/cache \
    HF_HUB_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
ENTRYPOINT ["modelfleet"]
CMD ["engine", "--help"]
