"""The vocabulary padding does not change the model (issue: resharding changed the loss).

Megatron-LM pads the vocabulary to a multiple of make-vocab-size-divisible-by x TP, so the
same tokenizer gets a different padded size at TP1 and TP2 (here 128 ids: 144 rows at TP1
with a multiple of 48, 192 at TP2). The padding ids' logits are masked
(models/gpt.py::mask_padded_logits): the losses and the gradients of every real row must be
those of any other padding, even with large random values in the padding rows, and the
padding rows get no gradient. An unmasked model is run too, so the test can fail: its loss
moves by far more than the tolerance.
"""

from __future__ import annotations

import pytest

from arra_megatron.runtime.launch import run_workers
from tests.parallel import layout_worker

REAL = layout_worker.tiny.VOCAB_SIZE  # the ids the synthetic batches use
PADDED = {"144": 144, "192": 192}
RTOL = 1e-5
ROWS = ("word_embeddings", "output_layer")  # the parameters with one row per vocabulary id

LAYOUTS = {
    1: [("TP1, 144 rows", {"vocab": (144, REAL), "ckpt": "144"}),
        ("TP1, 192 rows", {"vocab": (192, REAL), "ckpt": "192"}),
        ("TP1, 192 rows, unmasked", {"vocab": (192, None), "ckpt": "192"})],
    2: [("TP2, 192 rows", {"tp": 2, "vocab": (192, REAL), "ckpt": "192"}),
        ("TP2 + SP, 192 rows", {"tp": 2, "sp": True, "vocab": (192, REAL), "ckpt": "192"}),
        # Resharding as the trainer does it: the TP1 checkpoint's 144 rows into TP2's 192
        # (Megatron's embedding and output layer load with allow_shape_mismatch).
        ("TP2, 192 rows, from the 144-row checkpoint", {"tp": 2, "vocab": (192, REAL), "ckpt": "144"})],
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("padded_refs"))
    run_workers(layout_worker.save_padded_references, 1, root, REAL, PADDED)
    return layout_worker.run_named_layouts(root, LAYOUTS)


def _real_rows(name: str, grad):
    return grad[:REAL] if name in ROWS else grad


@pytest.mark.parametrize("name", ["TP1, 192 rows", "TP2, 192 rows", "TP2 + SP, 192 rows",
                                  "TP2, 192 rows, from the 144-row checkpoint"])
def test_padding_changes_nothing(results, name):
    ref, got = results["TP1, 144 rows"], results[name]
    for key, value in ref["metrics"].items():
        assert got["metrics"][key] == pytest.approx(value, rel=RTOL, abs=1e-7), f"{name}: {key}"
    for key, grad in ref["grads"].items():
        expected, actual = _real_rows(key, grad), _real_rows(key, got["grads"][key])
        err = float((actual - expected).norm() / expected.norm())
        assert err <= RTOL, f"{name}: gradient of {key} differs by {err:.2e} relative"
    for key in ROWS:
        assert float(got["grads"][key][REAL:].abs().max()) == 0.0, f"{name}: a padding row of {key} got a gradient"


def test_unmasked_padding_would_change_the_loss(results):
    masked = results["TP1, 192 rows"]["metrics"]["lm loss"]
    unmasked = results["TP1, 192 rows, unmasked"]["metrics"]["lm loss"]
    assert abs(unmasked - masked) > 0.1, (masked, unmasked)
    assert results["TP1, 192 rows"]["metrics"]["gva loss"] == results["TP1, 192 rows, unmasked"]["metrics"]["gva loss"]
