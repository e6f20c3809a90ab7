"""The encoder tests' own fixture; the encoders several directories use are in tests/conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.encoders.fixtures import make_tiny_biomedclip


@pytest.fixture(scope="session")
def tiny_biomedclip_dir(tmp_path_factory) -> Path:
    """A BiomedCLIP-style open_clip model (timm vision tower) in open_clip's local-dir format."""
    return make_tiny_biomedclip(tmp_path_factory.mktemp("biomedclip"))
