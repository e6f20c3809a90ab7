"""One run of every layout of layout_worker.LAYOUTS, shared by the layout and padding tests."""

from __future__ import annotations

import pytest

from arra_megatron.runtime.launch import run_workers
from tests.parallel import layout_worker


@pytest.fixture(scope="session")
def layout_results(tmp_path_factory) -> dict:
    """name -> {layout, metrics, grads, rows} for every layout, from one reference checkpoint."""
    ckpt = str(tmp_path_factory.mktemp("reference_ckpt"))
    run_workers(layout_worker.save_reference, 1, ckpt)
    return layout_worker.run_named_layouts(ckpt, layout_worker.LAYOUTS)
