"""L_AR, L_GVA and gradients do not depend on the parallel layout (ARRA_METHOD.md, "Invariance").

Every layout is Megatron-LM's loop as ``pretrain`` sets it up (layout_worker.py): one set of
full weights is saved once as a Megatron-LM checkpoint and read by ``--load`` into every
layout; the same global batch of 8 samples (every third one without an image, variable
condition lengths, right padding) runs through Megatron-Core's schedules with the loop's
forward step, on gloo processes in CPU mode. Each layout must reproduce the TP1/PP1 reference
within 1e-5 relative (fp32): the losses, and the gradients of the word embeddings (their rows
of real ids: TP1 and TP2 pad the vocabulary differently, test_vocab_padding.py), layer k's
fused QKV, the projector, the last layer's fc2 and the output layer, compared by
||g - g_ref|| <= 1e-5 ||g_ref||. Megatron-LM's loop frees pipeline stage outputs early
(``deallocate_pipeline_outputs``), so every PP layout runs with that on.
"""

from __future__ import annotations

import pytest

from tests.parallel.layout_worker import MASKED, REFERENCE, VOCAB, reference_for

RTOL = 1e-5
ROWS = ("word_embeddings", "output_layer")  # the parameters with one row per vocabulary id


def real_rows(name: str, grad):
    return grad[:VOCAB] if name in ROWS else grad


def test_reference_is_meaningful(layout_results):
    ref = layout_results[REFERENCE]
    assert set(ref["grads"]) == {
        "word_embeddings", "layer1.linear_qkv", "layer4.linear_fc2", "output_layer",
        "projector.linear_fc1.weight", "projector.linear_fc1.bias",
        "projector.linear_fc2.weight", "projector.linear_fc2.bias",
    }
    for name, grad in ref["grads"].items():
        assert grad.norm() > 0, f"{name} got no gradient"
    m = ref["metrics"]
    assert 0 < m["gva loss"] < 2 and -1 < m["gva cos"] < 1
    assert m["loss"] == pytest.approx(m["lm loss"] + m["gva loss"], rel=1e-12)
    assert layout_results["z-loss reference"]["metrics"]["z loss"] > 0


@pytest.mark.parametrize("name", MASKED)
def test_layout_matches_reference(layout_results, name):
    got = layout_results[name]
    ref = layout_results[reference_for(got["layout"])]
    for key, value in ref["metrics"].items():
        assert got["metrics"][key] == pytest.approx(value, rel=RTOL, abs=1e-7), f"{name}: {key}"
    assert set(got["grads"]) == set(ref["grads"]), f"{name}: gradients collected differ"
    for key, grad in ref["grads"].items():
        expected, actual = real_rows(key, grad), real_rows(key, got["grads"][key])
        err = float((actual - expected).norm() / expected.norm())
        assert err <= RTOL, f"{name}: gradient of {key} differs by {err:.2e} relative"


def test_gva_gradient_reaches_layer_k_and_below_only(layout_results):
    """The tapped layer's weights get a different gradient with and without the GVA term;
    the output layer (above layer k, and not fed by it otherwise) gets the same."""
    ref = layout_results[REFERENCE]
    k3 = layout_results["k=3 reference"]
    assert float((ref["grads"]["output_layer"] - k3["grads"]["output_layer"]).norm()) == 0.0
    assert float((ref["grads"]["word_embeddings"] - k3["grads"]["word_embeddings"]).norm()) > 0.0
