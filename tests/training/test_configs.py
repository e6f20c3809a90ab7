"""The recipes in examples/configs/ parse and validate for the GPU count they were written for.

Each recipe goes through the trainer's own ``parse_args`` (every cross-flag rule:
divisibility of the batch, heads and layers by the layout, layer k inside the model,
schedule) with its data flags replaced by ``--mock-data`` (the recipes carry no data
path), and its sequence length is checked against the sample layout
``[BOS] condition [BOI] x_1..x_n [EOI] [EOS]`` it is meant for.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess

import pytest
import yaml

from arra_megatron.tokenization.profile import NUM_FRAME_TOKENS, ModelIdentity, TokenizerProfile
from arra_megatron.training.arguments import parse_args, transformer_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "examples", "configs")
SCRIPTS = os.path.join(ROOT, "examples", "scripts")

# recipe -> (intended world size, extra command-line flags, image tokens per sample, shortest condition)
RECIPES = {
    "llamagen_b_c2i_imagenet256.yaml": (8, [], 256, 1),
    "llamagen_l_c2i_imagenet256.yaml": (8, [], 256, 1),
    "t2i_1b_laion_coco.yaml": (16, [], 256, 1),
    "chameleon7b_mimic_cxr512.yaml": (8, [], 1024, 1),
    "demo.yaml": (2, ["--tensor-model-parallel-size", "2"], 16, 1),
}


def recipe_path(name: str) -> str:
    return os.path.join(CONFIGS, name)


def parse_recipe(name: str, tmp_path, *extra: str):
    world, flags, _, _ = RECIPES[name]
    with open(recipe_path(name)) as f:
        keys = yaml.safe_load(f)
    data = ["--mock-data"] + ([] if "vocab-size" in keys else ["--vocab-size", "512"])
    save = ["--save", str(tmp_path / "ckpt")]  # the recipes set --save-interval; --save is per run
    return parse_args(["--config", recipe_path(name), *data, *save, *flags, *extra], world_size=world)


def test_every_recipe_is_covered():
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIGS, "*.yaml")))
    assert found == sorted(RECIPES), "add new recipes to RECIPES with their intended world size"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_is_consistent(name, tmp_path):
    with open(recipe_path(name)) as f:
        text = f.read()
    keys = yaml.safe_load(text)
    assert text.startswith("#"), "each recipe starts with a comment header (source, what to change)"
    assert not {"data-path", "data_path", "mock-data", "mock_data"} & set(keys), "data paths stay out of recipes"

    args = parse_recipe(name, tmp_path)
    world, _, image_tokens, min_condition = RECIPES[name]
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    assert tp * pp * args.data_parallel_size == world
    assert args.num_microbatches * args.micro_batch_size * args.data_parallel_size == args.global_batch_size
    assert 1 <= args.arra_align_layer <= args.num_layers
    assert args.hidden_size % args.num_attention_heads == 0 and args.num_attention_heads % tp == 0
    assert args.num_layers % pp == 0
    if args.sequence_parallel:
        assert args.seq_length % tp == 0, "sequence parallelism splits the sequence over TP ranks"
    # A document of seq_length + 1 tokens gives seq_length input positions; the shortest
    # sample (frame tokens, image, smallest condition) must fit.
    assert args.seq_length + 1 >= NUM_FRAME_TOKENS + image_tokens + min_condition
    assert args.max_position_embeddings >= args.seq_length
    assert args.lr_warmup_iters < args.lr_decay_iters
    # Megatron-Core's own checks on the model config (TransformerConfig.__post_init__).
    config = transformer_config(args)
    assert config.num_layers == args.num_layers


@pytest.mark.parametrize("name", ["llamagen_b_c2i_imagenet256.yaml", "llamagen_l_c2i_imagenet256.yaml"])
def test_llamagen_c2i_recipes(name, tmp_path):
    args = parse_recipe(name, tmp_path)
    size = {"llamagen_b": (12, 768, 12), "llamagen_l": (24, 1024, 16)}[name[:10]]
    assert (args.num_layers, args.hidden_size, args.num_attention_heads) == size
    assert args.normalization == "RMSNorm" and args.swiglu and args.disable_bias_linear
    assert args.position_embedding_type == "rope" and args.untie_embeddings_and_output_weights
    assert args.micro_batch_size == 32  # the paper's batch 32 per GPU
    assert args.lr == 1e-4
    assert args.vocab_size >= 1000 + 16384 + 6  # classes + VQ-16 codes + special tokens
    assert args.seq_length >= 260
    assert (args.arra_align_layer, args.arra_weight, args.arra_objective, args.arra_target) == (1, 1.0, "cos", "hybnext")
    assert (args.arra_target_dim, args.arra_aggregation, args.arra_projector) == (512, "cls", "mlp")


def test_t2i_1b_recipe(tmp_path):
    args = parse_recipe("t2i_1b_laion_coco.yaml", tmp_path)
    h, layers = args.hidden_size, args.num_layers
    block_params = layers * (4 * h * h + 3 * h * args.ffn_hidden_size)
    assert 0.9e9 < block_params < 1.5e9
    assert args.seq_length >= 256 + NUM_FRAME_TOKENS + 100  # room for a caption of ~120 tokens
    assert args.bf16 and args.use_distributed_optimizer
    assert args.arra_target_dim == 512 and args.arra_align_layer == 1


def test_chameleon_recipe_has_the_papers_settings(tmp_path):
    args = parse_recipe("chameleon7b_mimic_cxr512.yaml", tmp_path)
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.ffn_hidden_size) == (32, 4096, 32, 11008)
    assert args.normalization == "RMSNorm" and args.qk_layernorm and args.swiglu
    assert args.vocab_size == 65536
    assert args.lr == pytest.approx(2e-5)
    assert args.weight_decay == pytest.approx(0.05)
    assert (args.adam_beta1, args.adam_beta2) == (0.9, 0.95)
    assert args.z_loss_weight == pytest.approx(1e-5)
    assert args.seq_length >= 1024 + NUM_FRAME_TOKENS
    assert args.arra_targets == "online" and "BiomedCLIP" in args.arra_encoder
    assert (args.arra_target_dim, args.arra_aggregation, args.arra_align_layer, args.arra_weight) == (512, "cls", 1, 1.0)
    assert args.bf16 and args.use_distributed_optimizer and args.sequence_parallel
    assert (args.tensor_model_parallel_size, args.data_parallel_size) == (4, 2)


def test_chameleon_alternative_layout_tp2_pp2(tmp_path):
    """The TP2 x PP2 plan named in the recipe's header also validates; with virtual
    stages it needs a micro-batch count divisible by PP, as the header says."""
    layout = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    args = parse_recipe("chameleon7b_mimic_cxr512.yaml", tmp_path, *layout)
    assert args.data_parallel_size == 2 and args.num_microbatches == 3
    args = parse_recipe("chameleon7b_mimic_cxr512.yaml", tmp_path, *layout,
                        "--num-layers-per-virtual-pipeline-stage", "4", "--global-batch-size", "8")
    assert args.virtual_pipeline_model_parallel_size == 4


def write_dataset_manifest(prefix, profile: TokenizerProfile, max_seq_length: int, target_dim: int) -> None:
    """The files the argument checks read before any process group: PREFIX.bin/.idx and the
    manifest PREFIX.json with the tokenizer profile the builder would store for this data."""
    for ext in (".bin", ".idx"):
        open(f"{prefix}{ext}", "wb").close()
    manifest = {"tokenizer_profile": profile.to_dict(), "max_seq_length": max_seq_length,
                "features": {"file": "features.npy", "dtype": "float16", "shape": [1, target_dim]}}
    with open(f"{prefix}.json", "w") as f:
        json.dump(manifest, f)


VQ16 = ModelIdentity(kind="JanusVQVAE", path="/models/llamagen_vq16", sha256="0" * 64)
PREPROCESS = {"resize": 256, "crop": 256}


@pytest.mark.parametrize("name, profile, longest", [
    # ImageNet class folders: 1000 class tokens, no text tokenizer.
    ("llamagen_b_c2i_imagenet256.yaml",
     TokenizerProfile.create(text_vocab_size=0, text_special_ids={}, num_classes=1000, image_codebook_size=16384,
                             image_size=256, tokens_per_image=256, image_preprocessing=PREPROCESS, vq_model=VQ16),
     NUM_FRAME_TOKENS + 1 + 256),
    ("llamagen_l_c2i_imagenet256.yaml",
     TokenizerProfile.create(text_vocab_size=0, text_special_ids={}, num_classes=1000, image_codebook_size=16384,
                             image_size=256, tokens_per_image=256, image_preprocessing=PREPROCESS, vq_model=VQ16),
     NUM_FRAME_TOKENS + 1 + 256),
    # LAION-COCO captions with a 32000-token LLaMA-2 sentencepiece (BOS 1, EOS 2, no PAD).
    ("t2i_1b_laion_coco.yaml",
     TokenizerProfile.create(text_vocab_size=32000, text_special_ids={"bos": 1, "eos": 2}, num_classes=0,
                             image_codebook_size=16384, image_size=256, tokens_per_image=256,
                             image_preprocessing=PREPROCESS, vq_model=VQ16),
     385),
])
def test_recipe_fits_its_dataset(name, profile, longest, tmp_path):
    """With --data-path, the recipe's vocabulary, sequence length and target dimension
    pass the manifest checks for the dataset the recipe's header says to build."""
    prefix = str(tmp_path / "data")
    write_dataset_manifest(prefix, profile, longest, target_dim=512)
    world = RECIPES[name][0]
    args = parse_args(["--config", recipe_path(name), "--data-path", prefix, "--save", str(tmp_path / "ckpt")],
                      world_size=world)
    assert args.data_path == [prefix] and not args.mock_data
    assert args.vocab_size >= profile.vocab_size
    assert args.seq_length + 1 >= longest


@pytest.mark.parametrize("script", ["pretrain_multinode.sh", "pretrain_slurm.sbatch"])
def test_launch_scripts_are_valid_bash(script):
    path = os.path.join(SCRIPTS, script)
    assert os.access(path, os.X_OK), f"{script} is not executable"
    proc = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", path], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout
