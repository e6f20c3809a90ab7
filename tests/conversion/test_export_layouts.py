"""Export reads any layout of Megatron-LM's loop: a checkpoint it wrote with virtual pipeline
stages, or with DP2 and the distributed optimizer, exports bit-identical to the TP1 import's export."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from arra_megatron.conversion.hf_export import export_checkpoint  # noqa: E402
from arra_megatron.conversion.hf_import import import_checkpoint  # noqa: E402
from tests.conversion.fixtures import hf_weights, make_llama  # noqa: E402
from tests.conversion.llama_worker import save_in_layout  # noqa: E402

LAYOUTS = {
    "pp2-vpp2": (2, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]),
    "dp2-distopt": (2, ["--use-distributed-optimizer"]),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    hf_dir = make_llama(root / "hf", 128, tied=False, seed=2)
    record = import_checkpoint(hf_dir, str(root / "ckpt"))
    export_checkpoint(str(root / "ckpt"), str(root / "tp1"))
    return {"root": root, "ckpt": str(root / "ckpt"), "record": record, "weights": hf_weights(str(root / "tp1"))}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_exports_bit_identical(reference, name):
    world, layout = LAYOUTS[name]
    root = reference["root"]
    save_in_layout(reference["ckpt"], reference["record"]["trainer_flags"], layout, world, str(root / name))
    from arra_megatron.training import checkpoints

    args = checkpoints.saved_args(checkpoints.resolve(str(root / name)))
    assert args.use_distributed_optimizer == (name == "dp2-distopt")
    assert (args.virtual_pipeline_model_parallel_size == 2) == (name == "pp2-vpp2")
    summary = export_checkpoint(str(root / name), str(root / f"{name}-hf"))
    assert summary["left_out"] and all(k.startswith("arra_projector.") for k in summary["left_out"])
    exported = hf_weights(str(root / f"{name}-hf"))
    assert sorted(exported) == sorted(reference["weights"])
    for key, tensor in reference["weights"].items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    with open(root / f"{name}-hf" / "config.json") as f, open(root / "tp1" / "config.json") as g:
        assert json.load(f) == json.load(g)


def test_chameleon_trained_at_tp2_sp_matches_tp1(tmp_path):
    """One SGD step (clipped: the grad norm counts every parameter once) from an imported Chameleon
    at TP1, TP2 and TP2 with sequence parallel gives the same model: the per-head q/k LayerNorm
    gradients are complete on every rank (see models/norms.py) and counted once in the norm.
    Both export through the import found from the run's --load (vocabulary map, VQ-VAE)."""
    from tests.conversion.fixtures import make_chameleon

    hf_dir = make_chameleon(tmp_path / "hf", seed=1)
    record = import_checkpoint(hf_dir, str(tmp_path / "ckpt"))
    step = ["--optimizer", "sgd", "--lr", "0.1", "--weight-decay", "0", "--clip-grad", "0.05", "--no-arra"]
    exported = {}
    layouts = (("tp1", 1, []), ("tp2", 2, ["--tensor-model-parallel-size", "2"]),
               ("tp2-sp", 2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]))
    for name, world, layout in layouts:
        save_in_layout(str(tmp_path / "ckpt"), record["trainer_flags"],
                       ["--pipeline-model-parallel-size", "1", "--tensor-model-parallel-size", "1"] + step + layout,
                       world, str(tmp_path / name))
        export_checkpoint(str(tmp_path / name), str(tmp_path / f"{name}-hf"), "chameleon")
        exported[name] = hf_weights(str(tmp_path / f"{name}-hf"))
    original = hf_weights(hf_dir)
    a = exported["tp1"]
    assert sorted(a) == sorted(original)
    for name in ("tp2", "tp2-sp"):
        b = exported[name]
        assert sorted(b) == sorted(original)
        worst = {"all": 0.0, "qk_norm": 0.0}
        for key, tensor in original.items():
            if key.startswith("model.vqmodel."):
                assert torch.equal(a[key], tensor) and torch.equal(b[key], tensor), key
                continue
            diff = (a[key] - b[key]).abs().max().item()
            worst["all"] = max(worst["all"], diff)
            assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-6), (name, key, diff)
            if "q_norm" in key or "k_norm" in key:
                worst["qk_norm"] = max(worst["qk_norm"], diff)
                assert (a[key] - tensor).abs().max() > 1e-6, key  # the step moved every per-head norm
        print(f"\n[chameleon TP1 vs {name} after one SGD step] max |weight diff| {worst['all']:.3e} "
              f"(per-head q/k norms {worst['qk_norm']:.3e})")
