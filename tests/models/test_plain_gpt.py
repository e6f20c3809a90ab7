"""ARRA is attached from outside: off, the model is a plain GPTModel; on, the projector sits beside it."""

from __future__ import annotations

import pytest

from arra_megatron.runtime.launch import run_workers
from tests.models import plain_worker


@pytest.fixture(scope="module")
def result():
    return run_workers(plain_worker.run, 1)[0]


def test_arra_off_is_a_plain_gpt(result):
    assert result["off_is_plain_type"]
    assert result["same_weights"]
    assert result["metric keys"] == ["lm loss", "loss"]
    assert result["lm loss"] == pytest.approx(result["direct"], rel=1e-6)


def test_projector_never_in_the_model_keys(result):
    assert result["on gpt keys"] == result["plain keys"]
    assert not any("projector" in k for k in result["on gpt keys"])
    projector_keys = [k for k in result["on chunk keys"] if k not in result["plain keys"]]
    assert projector_keys == ["arra_projector.linear_fc1.bias", "arra_projector.linear_fc1.weight",
                              "arra_projector.linear_fc2.bias", "arra_projector.linear_fc2.weight"]
    extra = sorted(set(result["on sharded keys"]) - set(result["plain sharded keys"]))
    assert extra == projector_keys
