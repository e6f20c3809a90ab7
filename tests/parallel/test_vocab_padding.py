"""The vocabulary padding does not change the model (issue: resharding changed the loss).

Megatron-LM pads the vocabulary to a multiple of make-vocab-size-divisible-by x TP, so the
same tokenizer gets a different padded size at each TP size: here 300 ids, 384 rows at TP1
and 512 at TP2. The layouts of test_layout_invariance.py (one run, conftest.py) load a TP1
checkpoint whose padding rows hold large random values into both paddings. The padding ids'
logits are masked (models/gpt.py::mask_padded_logits): the losses and the real rows'
gradients match across paddings (test_layout_invariance.py) and the padding rows get no
gradient. An unmasked model is run too, so the test can fail: its loss moves by far more
than the tolerance.
"""

from __future__ import annotations

import pytest

from tests.parallel.layout_worker import MASKED, REFERENCE, UNMASKED, VOCAB

ROWS = ("word_embeddings", "output_layer")  # the parameters with one row per vocabulary id


def test_layouts_cross_vocabulary_paddings(layout_results):
    assert {layout_results[name]["rows"] for name in MASKED} == {384, 512}
    assert layout_results[REFERENCE]["grads"]["output_layer"].shape[0] == 384
    assert layout_results["TP2 + SP"]["grads"]["output_layer"].shape[0] == 512
    assert layout_results["TP2 x PP2"]["grads"]["word_embeddings"].shape[0] == 512


@pytest.mark.parametrize("name", [REFERENCE, "TP2", "TP2 + SP", "PP2 x VPP2, k=3", "TP2 x PP2",
                                  "TP2 x PP2 + SP + selective recompute, k=3"])
def test_padding_rows_get_no_gradient(layout_results, name):
    got = layout_results[name]
    for key in ROWS:
        assert float(got["grads"][key][:VOCAB].abs().max()) > 0.0, f"{name}: {key} got no gradient at all"
        assert float(got["grads"][key][VOCAB:].abs().max()) == 0.0, f"{name}: a padding row of {key} got a gradient"


def test_unmasked_padding_would_change_the_loss(layout_results):
    masked = layout_results[REFERENCE]["metrics"]
    unmasked = layout_results[UNMASKED]["metrics"]
    assert layout_results[UNMASKED]["rows"] == 384
    assert abs(unmasked["lm loss"] - masked["lm loss"]) > 0.1, (masked, unmasked)
    assert unmasked["gva loss"] == masked["gva loss"]
