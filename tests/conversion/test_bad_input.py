"""Conversion inputs that cannot work fail with a message naming the flag or file, and leave
nothing behind."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from arra_megatron.conversion.common import ConversionError  # noqa: E402
from arra_megatron.conversion.hf_export import check_layout, checkpoint_architecture, export_checkpoint  # noqa: E402
from arra_megatron.conversion.hf_import import import_checkpoint  # noqa: E402
from tests.conversion.fixtures import make_llama  # noqa: E402
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def leftovers(directory) -> list:
    return [n for n in os.listdir(directory) if ".partial-" in n]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("hf") / "llama", 128, tied=False)


def test_unsupported_architecture(tmp_path):
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(
        tmp_path / "gpt2")
    with pytest.raises(ConversionError, match="GPT2LMHeadModel is not a supported architecture .*LlamaForCausalLM"):
        import_checkpoint(str(tmp_path / "gpt2"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)
    with pytest.raises(ConversionError, match="no config.json"):
        import_checkpoint(str(tmp_path), str(tmp_path / "out"))


def test_unsupported_llama_variants(tmp_path, llama_dir):
    config = transformers.AutoConfig.from_pretrained(llama_dir)
    config.rope_parameters = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config.save_pretrained(tmp_path / "scaled")
    with pytest.raises(ConversionError, match="rope type 'llama3'"):
        import_checkpoint(str(tmp_path / "scaled"), str(tmp_path / "out"))
    config = transformers.AutoConfig.from_pretrained(llama_dir)
    config.attention_bias = True
    config.save_pretrained(tmp_path / "bias")
    with pytest.raises(ConversionError, match="attention_bias"):
        import_checkpoint(str(tmp_path / "bias"), str(tmp_path / "out"))


def test_pickled_or_incomplete_weights(tmp_path, llama_dir):
    from safetensors.torch import load_file, save_file

    transformers.AutoConfig.from_pretrained(llama_dir).save_pretrained(tmp_path / "pickled")
    torch.save({"x": torch.zeros(1)}, tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="pickled weights are not read"):
        import_checkpoint(str(tmp_path / "pickled"), str(tmp_path / "out"))

    transformers.AutoConfig.from_pretrained(llama_dir).save_pretrained(tmp_path / "partial")
    weights = load_file(os.path.join(llama_dir, "model.safetensors"))
    del weights["model.layers.2.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "partial" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"missing \['model.layers.2.mlp.up_proj.weight'\]"):
        import_checkpoint(str(tmp_path / "partial"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_layout_that_does_not_split(tmp_path, llama_dir):
    with pytest.raises(ConversionError, match="--pipeline-model-parallel-size 3"):
        import_checkpoint(llama_dir, str(tmp_path / "out"), 1, 3)
    with pytest.raises(ConversionError, match="--tensor-model-parallel-size 4 must divide the key/value groups"):
        import_checkpoint(llama_dir, str(tmp_path / "out"), 4, 1)


def test_existing_outputs_and_inconsistent_checkpoint(tmp_path, llama_dir):
    """One real TP1 import serves the export-side checks."""
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConversionError, match="--save .*taken already exists"):
        import_checkpoint(llama_dir, str(tmp_path / "taken"))
    ckpt = tmp_path / "ckpt"
    import_checkpoint(llama_dir, str(ckpt))
    with pytest.raises(ConversionError, match="--hf-out .*taken already exists"):
        export_checkpoint(str(ckpt), str(tmp_path / "taken"))
    assert os.listdir(tmp_path / "taken") == []
    with pytest.raises(ConversionError, match="no checkpoint there"):
        export_checkpoint(str(tmp_path / "taken"), str(tmp_path / "hf"))

    # The saved arguments against the stored tensors.
    from megatron.core import dist_checkpointing

    from arra_megatron.training import checkpoints

    path = checkpoints.resolve(str(ckpt))
    metadata = dist_checkpointing.load_tensors_metadata(path)
    args = checkpoints.saved_args(path)
    arch = checkpoint_architecture(args)
    assert check_layout(metadata, arch) == 128
    with pytest.raises(ConversionError, match="linear_qkv.weight has shape .* needs"):
        check_layout(metadata, dataclasses.replace(arch, num_query_groups=4))
    with pytest.raises(ConversionError, match="contradicts its recorded tied embeddings"):
        check_layout(metadata, dataclasses.replace(arch, tie_embeddings=True))
    with pytest.raises(ConversionError, match="not a Llama-style model; export needs --swiglu, no --add-qkv-bias"):
        checkpoint_architecture(argparse.Namespace(**{**vars(args), "swiglu": False, "add_qkv_bias": True}))
    with pytest.raises(ConversionError, match="pass --vocab-size"):
        checkpoint_architecture(argparse.Namespace(**{**vars(args), "vocab_size": None}))

    # Through the CLI: a vocabulary larger than the stored embedding, exit status 2, nothing written.
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "export",
                           "--load", str(ckpt), "--hf-out", str(tmp_path / "hf"), "--vocab-size", "1000"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "ARRA_CPU_MODE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "does not hold vocabulary 1000" in proc.stderr
    assert not (tmp_path / "hf").exists() and not leftovers(tmp_path)


def test_checkpoints_before_megatron_lm_layout(tmp_path):
    """An import, or a run of the project's own trainer, from before checkpoints took Megatron-LM's
    layout: export names what to do instead of reading them."""
    old_import = tmp_path / "old_import"
    (old_import / "iter_0000000").mkdir(parents=True)
    (old_import / "latest_checkpointed_iteration.txt").write_text("0")
    for name in ("metadata.json", "arra_complete.json"):
        (old_import / "iter_0000000" / name).write_text("{}")
    (old_import / "arra_conversion.json").write_text(json.dumps({"architecture": {}, "source": "/models/llama"}))
    with pytest.raises(ConversionError, match="import the model again: .* --hf /models/llama --save NEW_DIR"):
        export_checkpoint(str(old_import), str(tmp_path / "hf"))
    old_run = os.path.join(ROOT, "tests", "training", "data", "legacy_trainer", "ckpt")
    with pytest.raises(ConversionError, match="convert it once with: python tools/convert_checkpoint.py legacy"):
        export_checkpoint(old_run, str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()
