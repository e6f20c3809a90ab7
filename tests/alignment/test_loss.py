"""L_GVA through the tap equals ARRA_METHOD.md written out sample by sample."""

from __future__ import annotations

import pytest
import torch

from arra_megatron import tiny
from arra_megatron.alignment.loss import alignment_mask, hybnext_mask, position_weights, rep_mask
from arra_megatron.runtime.launch import run_workers
from tests.alignment import loss_worker

CASES = {
    "cos/hybnext/mlp": {},
    "mse/hybnext/mlp": {"objective": "mse"},
    "cos/rep/mlp": {"target": "rep"},
    "mse/rep/mlp": {"objective": "mse", "target": "rep"},
    "cos/hybnext/pool": {"projector": "pool"},
    "mse/rep/pool": {"objective": "mse", "target": "rep", "projector": "pool"},
    "lambda=0": {"weight": 0.0},
    "lambda=2": {"weight": 2.0},
}


def _run_all(cases):
    return {name: loss_worker.run_case(kwargs) for name, kwargs in cases.items()}


@pytest.fixture(scope="module")
def results():
    return run_workers(_run_all, 1, CASES)[0]


@pytest.mark.parametrize("name", list(CASES))
def test_tap_matches_reference(results, name):
    r = results[name]
    assert r["num aligned"] == 4  # 6 samples, every third without an image
    assert r["gva loss"] == pytest.approx(r["gva loss ref"], rel=1e-12)
    assert r["gva cos"] == pytest.approx(r["gva cos ref"], rel=1e-12, abs=1e-14)
    torch.testing.assert_close(r["grad_h"], r["grad_h ref"], rtol=1e-10, atol=1e-14)
    for key, grad in r["params ref"].items():
        torch.testing.assert_close(r["params"][key], grad, rtol=1e-10, atol=1e-14)


def test_lambda_zero_reports_loss_but_sends_no_gradient(results):
    r = results["lambda=0"]
    assert r["gva loss"] > 0
    assert float(r["grad_h"].abs().max()) == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in r["params"].values())
    # lambda scales the gradient, not the reported loss.
    assert results["lambda=2"]["gva loss"] == pytest.approx(results["cos/hybnext/mlp"]["gva loss"], rel=1e-12)
    torch.testing.assert_close(results["lambda=2"]["grad_h"], 2 * results["cos/hybnext/mlp"]["grad_h"])


def test_masks_follow_the_labels():
    # [BOS] c c [BOI] x x x [EOI] [EOS] [PAD]: labels are the next tokens.
    tokens = torch.tensor([[tiny.BOS, 7, 8, tiny.BOI, 64, 65, 66, tiny.EOI, tiny.EOS, tiny.PAD]])
    labels = torch.cat([tokens[:, 1:], torch.tensor([[tiny.PAD]])], dim=1)
    hyb = hybnext_mask(labels, tiny.IMAGE_TOKEN_RANGE)
    # The BOI position predicts x_1; the position of x_{n-1} predicts x_n; x_n predicts EOI.
    assert hyb.nonzero()[:, 1].tolist() == [3, 4, 5]
    assert rep_mask(labels, tiny.IMAGE_TOKEN_RANGE).nonzero()[:, 1].tolist() == [3]
    w = position_weights(alignment_mask(labels, tiny.IMAGE_TOKEN_RANGE, "hybnext"))
    assert w.sum().item() == pytest.approx(1.0)
    text_only = torch.tensor([[7, 8, tiny.EOS, tiny.PAD]])
    assert position_weights(hybnext_mask(text_only, tiny.IMAGE_TOKEN_RANGE)).sum() == 0
