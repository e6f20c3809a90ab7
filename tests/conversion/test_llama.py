"""Llama <-> Megatron conversion: a tiny random LlamaForCausalLM with GQA, imported at TP2 x PP2,
gives in the model of Megatron-LM's loop the loss and logits transformers gives; exported back,
the same weights."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from arra_megatron.conversion.common import GPTArchitecture  # noqa: E402
from arra_megatron.conversion.hf_export import export_checkpoint  # noqa: E402
from arra_megatron.conversion.hf_import import import_checkpoint  # noqa: E402
from arra_megatron.runtime.launch import run_workers  # noqa: E402
from arra_megatron.training.checkpoints import IMPORT_RECORD_FILE  # noqa: E402
from tests.conversion.fixtures import (  # noqa: E402
    IMAGE_RANGE,
    assert_matches_transformers,
    assert_same_checkpoint,
    hf_reference,
    make_llama,
    samples,
)
from tests.conversion.llama_worker import SEQ, loop, megatron_outputs  # noqa: E402

TP, PP = 2, 2


@pytest.fixture(scope="module", params=[("untied", 128, False), ("tied-padded", 127, True)], ids=lambda p: p[0])
def imported(request, tmp_path_factory):
    """A tiny Llama, imported at TP2 x PP2; the untied one fits the vocabulary exactly, the tied one
    (vocabulary 127, odd) needs a padded row."""
    _, vocab, tied = request.param
    root = tmp_path_factory.mktemp(request.param[0])
    hf_dir = make_llama(root / "hf", vocab, tied)
    record = import_checkpoint(hf_dir, str(root / "ckpt"), TP, PP)
    return {"hf": hf_dir, "ckpt": str(root / "ckpt"), "record": record, "root": root, "vocab": vocab}


def test_import_matches_transformers(imported):
    record, vocab = imported["record"], imported["vocab"]
    ckpt = imported["ckpt"]
    from arra_megatron.training import checkpoints

    # Megatron-LM's layout: CKPT/release named by the tracker, described by its saved arguments.
    assert open(os.path.join(ckpt, checkpoints.TRACKER_FILE)).read().strip() == "release"
    args = checkpoints.saved_args(checkpoints.resolve(ckpt))
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.vocab_size) == (TP, PP, vocab)
    assert args.untie_embeddings_and_output_weights == (vocab == 128) and not args.add_bias_linear
    with open(os.path.join(ckpt, IMPORT_RECORD_FILE)) as f:
        assert json.load(f)["trainer_flags"] == record["trainer_flags"]
    assert record["padded_vocab_size"] == 128  # 127 needs one row to split over TP 2
    assert checkpoints.padded_vocab_rows(checkpoints.resolve(ckpt)) == 128
    batch = samples()
    results = run_workers(megatron_outputs, TP * PP, ckpt, record["trainer_flags"], TP, PP, batch, IMAGE_RANGE)
    hf_logits, hf_loss = hf_reference(imported["hf"], batch)
    assert_matches_transformers(f"{vocab=}", results, hf_logits, hf_loss, vocab)


def test_flags_round_trip_through_megatron_arguments():
    """Every model flag exists in Megatron-LM's parser (with the project's) and reads back as the
    same architecture: the saved arguments are the model's one description."""
    llama = GPTArchitecture(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                            num_query_groups=2, kv_channels=32, norm_epsilon=1e-6, rotary_base=500000.0,
                            vocab_size=127, tie_embeddings=True, max_position_embeddings=64)
    chameleon = dataclasses.replace(llama, kv_channels=16, norm_epsilon=1e-5, tie_embeddings=False,
                                    model_type="chameleon", qk_layernorm_per_head=True)
    for arch in (llama, chameleon):
        args = arch.megatron_args(2, 2, "bfloat16", make_vocab_size_divisible_by=1)
        assert args.bf16 and args.make_vocab_size_divisible_by == 1
        assert GPTArchitecture.from_args(args, arch.vocab_size) == arch


def test_export_round_trip(imported):
    out = imported["root"] / "exported"
    summary = export_checkpoint(imported["ckpt"], str(out), max_shard_size="100KB")
    assert summary["left_out"] == []
    with open(out / "model.safetensors.index.json") as f:
        assert len(set(json.load(f)["weight_map"].values())) > 1  # several shards, as save_pretrained writes
    assert_same_checkpoint(imported["hf"], str(out), (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_parameters", "tie_word_embeddings",
        "attention_bias", "mlp_bias", "max_position_embeddings"))
    b = transformers.AutoConfig.from_pretrained(str(out)).to_dict()
    generation = transformers.GenerationConfig.from_pretrained(str(out))
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (5, 6, 0)
    assert b["bos_token_id"] == 5 and b["eos_token_id"] == 6
    assert transformers.AutoTokenizer.from_pretrained(str(out))("t3 t17").input_ids == [3, 17]
    assert summary["tokenizer_files"] == ["tokenizer.json", "tokenizer_config.json"]
    tokens = samples()["tokens"]
    with torch.no_grad():
        ref = transformers.AutoModelForCausalLM.from_pretrained(imported["hf"], dtype=torch.float32)(tokens).logits
        got = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)(tokens).logits
    assert torch.equal(ref, got)


def test_trainer_checkpoint_exports(tmp_path):
    """Import (TP1), fine-tune with ARRA at TP2 x PP2 through Megatron-LM's loop, export:
    transformers' logits equal the trained Megatron model's; the projector is left out."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    hf_dir = make_llama(tmp_path / "hf", 128, tied=True, seed=1)
    env = {**os.environ, "ARRA_CPU_MODE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(root, "tools", "convert_checkpoint.py"), "import",
                           "--hf", hf_dir, "--save", str(tmp_path / "ckpt")],
                          capture_output=True, text=True, timeout=600, cwd=root, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(tmp_path / "ckpt" / IMPORT_RECORD_FILE) as f:
        record = json.load(f)
    assert "trainer flags: " + " ".join(record["trainer_flags"]) in proc.stdout
    loop(4, *record["trainer_flags"], "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
         "--seq-length", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2",
         "--lr", "1e-2", "--mock-data", "--arra-target-dim", "16", "--hidden-dropout", "0",
         "--attention-dropout", "0", "--eval-iters", "0", "--log-interval", "1",
         "--load", str(tmp_path / "ckpt"), "--finetune", "--save", str(tmp_path / "trained"), "--save-interval", "2")

    summary = export_checkpoint(str(tmp_path / "trained"), str(tmp_path / "exported"), tokenizer=hf_dir)
    assert summary["tokenizer_files"] == ["tokenizer.json", "tokenizer_config.json"]
    assert summary["left_out"] and all(k.startswith("arra_projector.") for k in summary["left_out"])
    batch = samples()
    results = run_workers(megatron_outputs, TP * PP, str(tmp_path / "trained"), record["trainer_flags"], TP, PP,
                          batch, IMAGE_RANGE)
    mega_logits = [r["logits"] for r in results if "logits" in r][0].double()
    hf_logits, hf_loss = hf_reference(str(tmp_path / "exported"), batch)
    original, _ = hf_reference(hf_dir, batch)
    diff = (mega_logits - hf_logits).abs().max().item()
    print(f"\n[trained] max |logit diff| {diff:.3e} (max |logit| {hf_logits.abs().max().item():.3f}, "
          f"moved {(hf_logits - original).abs().max().item():.3f} from the imported model); "
          f"loss megatron {results[-1]['metrics']['lm loss']:.8f} transformers {hf_loss:.8f}")
    assert (hf_logits - original).abs().max() > 1e-3  # training changed the model
    assert diff <= 1e-5 * hf_logits.abs().max().item()
    assert results[-1]["metrics"]["lm loss"] == pytest.approx(hf_loss, rel=1e-5)
