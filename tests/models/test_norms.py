"""The per-head q/k LayerNorm equals transformers' ChameleonLayerNorm, also on the heads of each
TP2 rank, and the training loop's flag selects it in every layer spec."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from arra_megatron.runtime.launch import run_workers  # noqa: E402
from tests.models import norms_worker  # noqa: E402
from tests.models.norms_worker import GROUPS, HEAD_DIM, HEADS  # noqa: E402


@pytest.mark.parametrize("tp", [1, 2])
def test_per_head_layernorm_matches_chameleon(tp):
    results = run_workers(norms_worker.run, tp, tp)
    for rank, result in enumerate(results):
        for name, heads in (("query", HEADS), ("key", GROUPS)):
            r = result[name]
            # Same operations as ChameleonLayerNorm (F.layer_norm, then * w + b): equal to rounding.
            assert r["max_diff"] <= 1e-6, (rank, name, r)
            assert r["global_shape"] == (heads * HEAD_DIM,) and r["global_offset"] == (0,)
            assert not r["tensor_model_parallel"]  # replicated; TP training is covered by tests/conversion
        assert result["specs"] == {b: ("PerHeadQueryLayerNorm", "PerHeadKeyLayerNorm") for b in ("local", "cpu")}


def test_loop_flag_selects_the_module(monkeypatch):
    """--qk-layernorm-per-head through megatron_loop.parse_args into the TransformerConfig."""
    from arra_megatron.training.megatron_loop import parse_args, transformer_config

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "16",
            "--max-position-embeddings", "16", "--micro-batch-size", "1", "--global-batch-size", "1",
            "--train-iters", "1", "--lr", "1e-4", "--mock-data", "--vocab-size", "128", "--no-arra",
            "--normalization", "RMSNorm"]
    with pytest.raises(SystemExit, match="--qk-layernorm-per-head needs --qk-layernorm"):
        parse_args(base + ["--qk-layernorm-per-head"])
    args, _ = parse_args(base + ["--qk-layernorm", "--qk-layernorm-per-head"])
    config = transformer_config(args)
    assert config.qk_layernorm and config.qk_layernorm_per_head
    assert not transformer_config(parse_args(base + ["--qk-layernorm"])[0]).qk_layernorm_per_head
