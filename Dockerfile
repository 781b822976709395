# mmap-serve on a GPU host:
#   docker build -t mmap-serve .
#   docker run --gpus all -p 8000:8000 -v $PWD/prompts:/prompts:ro mmap-serve
# Without a /prompts mount the image serves the embedded demo (tiny CLIP + its prompt sets).
# Settings: MMAP_* environment variables (or flags after the image name), see service/settings.py.
# Real weights: mount a checkpoint and name it (-v $PWD/models:/models:ro -e MMAP_MODEL=ViT-B-16
# -e MMAP_PRETRAINED=/models/vit-b-16.bin), or let open_clip fill its Hugging Face cache under
# HF_HOME=/cache/huggingface (mount a volume at /cache to keep it; HF_HUB_OFFLINE=1 once filled).
#
# torch and onnxruntime-gpu bring their own CUDA 13 / cuDNN 9 libraries as wheels, so the base only
# needs the NVIDIA container-runtime setup (a -runtime/-cudnn base would duplicate ~3 GB of
# libraries). Needs an NVIDIA driver >= 580 on the host (CUDA 13).
ARG BASE_IMAGE=nvidia/cuda:13.0.0-base-ubuntu22.04
FROM ${BASE_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive
# DL3008: Ubuntu's python3.11 is pinned by the base image tag; apt version pins break on every point release
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# The README's install steps (see the Makefile): torch first, then the project with its extras.
# EXTRAS=onnx-gpu,ray builds the Ray Serve image (deploy/ray).
ARG TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
ARG EXTRAS=onnx-gpu
# Hosts behind a package mirror or a TLS proxy pass pip's settings as build secrets, which no layer keeps:
#   docker build --secret id=pipconf,src=pip.conf --secret id=pipcert,src=/etc/ssl/certs/ca-certificates.crt .
# (pip reads the first as /etc/pip.conf; it names the second as `cert = /run/secrets/pipcert`). Both are optional.
# DL3013: TORCH_SPEC pins both versions (hadolint cannot see inside the variable)
# hadolint ignore=DL3013
RUN --mount=type=secret,id=pipconf,target=/etc/pip.conf --mount=type=secret,id=pipcert \
    python3.11 -m venv /opt/venv \
    && pip install --no-cache-dir --upgrade "pip>=24" \
    && pip install --no-cache-dir ${TORCH_SPEC}

WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY mmap_model ./mmap_model
COPY service ./service
# DL3013: this is the project itself; its dependencies are pinned in pyproject.toml
# hadolint ignore=DL3013
RUN --mount=type=secret,id=pipconf,target=/etc/pip.conf --mount=type=secret,id=pipcert \
    pip install --no-cache-dir ".[${EXTRAS}]"
COPY deploy/ray ./deploy/ray

# Non-root; /cache (onnx graphs, the Hugging Face cache) is the only place the service writes.
# /prompts starts as a copy of the embedded demo prompt sets; a mount replaces it.
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin mmap \
    && mkdir -p /cache/onnx /cache/huggingface /models /prompts \
    && python -c "import shutil; from mmap_model import EMBEDDED_PROMPTS_DIR as d; d.is_dir() and shutil.copytree(d, '/prompts', dirs_exist_ok=True)" \
    && chown -R 10001:10001 /cache

ENV MMAP_HOST=0.0.0.0 \
    MMAP_PORT=8000 \
    MMAP_PROMPTS=/prompts \
    MMAP_DEVICE=auto \
    MMAP_ONNX_CACHE=/cache/onnx \
    HF_HOME=/cache/huggingface \
    PYTHONPATH=/app/deploy/ray

USER 10001:10001
EXPOSE 8000
# /healthz = the process answers (liveness); orchestrators should gate traffic on /readyz.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('MMAP_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["python", "-m", "service"]
