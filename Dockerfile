# arra_megatron on an NGC PyTorch container: CUDA, PyTorch, Transformer Engine, apex and
# NVIDIA DALI come with the base image; this adds Megatron-Core and the project.
#
#   docker build -t arra-megatron .                      # needs no GPU
#   docker run --gpus all --ipc=host --ulimit memlock=-1 -v /data:/data arra-megatron \
#       torchrun --nproc-per-node 8 examples/pretrain_arra.py --config examples/configs/llamagen_b_c2i_imagenet256.yaml ...
#
# The base must ship Python 3.12 (megatron-core >= 0.17 needs it): NGC PyTorch 25.01 or newer.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /workspace/arra_megatron

# Dependencies first (a layer that survives source edits). torch, torchvision, Transformer
# Engine and DALI are the image's own builds: they are not reinstalled from PyPI, and the
# project itself goes in with --no-deps because setup.py pins the PyPI torch wheel.
# The ranges are setup.py's, so the image resolves what `pip install .` would (DL3013).
# hadolint ignore=DL3013
RUN python -c 'import sys; assert sys.version_info[:2] == (3, 12), f"arra_megatron needs Python 3.12, the base image has {sys.version}"' \
    && pip install \
        "megatron-core>=0.19.2,<0.20" \
        "transformers>=4.51" "sentencepiece>=0.2" "open_clip_torch>=3.0" "timm>=1.0" \
        braceexpand einops psutil pyyaml tqdm tensorboard \
        "torchmetrics>=1.4" "torch-fidelity>=0.3" scipy matplotlib

COPY setup.py README.md ./
COPY arra_megatron ./arra_megatron
COPY tools ./tools
COPY examples ./examples
RUN pip install --no-deps -e . \
    && python -c "import arra_megatron.training.trainer"

CMD ["python", "examples/pretrain_arra.py", "--help"]
