"""arra_megatron: ARRA (Autoregressive Representation Alignment) pretraining on Megatron-Core."""

import sys

from setuptools import find_packages, setup

if sys.version_info < (3, 12):
    sys.exit("arra_megatron needs Python >= 3.12 (megatron-core >= 0.17 requires it); "
             f"this is Python {sys.version.split()[0]}")

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
        "dev": ["pytest>=8", "pytest-timeout"],
    },
)
