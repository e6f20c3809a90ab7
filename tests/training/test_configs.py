"""The recipes in examples/configs/ parse and validate for the GPU count they were written for.

Each recipe goes through the loop's own ``megatron_loop.parse_args`` (Megatron-LM's
validation and the project's rules: every key a flag, layer k inside the model, the data
against the model) with its data flags given here (``--mock-data``, or a dataset manifest
for online targets; the recipes carry no data path), and its TransformerConfig through
``megatron_loop.transformer_config`` (Megatron-Core's own checks: heads by TP ...). Its
sequence length is checked against the sample layout ``[BOS] condition [BOI] x_1..x_n [EOI] [EOS]``
it is meant for.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest
import yaml

from arra_megatron.data.manifest import BuildCounts, DatasetFiles, DatasetManifest, FeatureTable
from arra_megatron.tokenization.profile import NUM_FRAME_TOKENS, ModelIdentity, SpecialTokens, TokenizerProfile
from arra_megatron.training.megatron_loop import build_parser, transformer_config

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


def parse_recipe(parse, name: str, tmp_path, *extra: str):
    world, flags, _, _ = RECIPES[name]
    with open(recipe_path(name)) as f:
        keys = yaml.safe_load(f)
    if keys.get("arra-targets") == "online":  # images come from a dataset: its manifest
        prefix = str(tmp_path / "online")
        write_dataset_manifest(prefix, CHAMELEON, NUM_FRAME_TOKENS + 125 + 1024, target_dim=None)
        data = ["--data-path", prefix]
    else:
        data = ["--mock-data"] + ([] if "vocab-size" in keys else ["--vocab-size", "512"])
    # --save is per run (Megatron-LM wants --save-interval with it: the recipes that set one)
    save = ["--save", str(tmp_path / "ckpt")] if "save-interval" in keys else []
    return parse(["--config", recipe_path(name), *data, *save, *flags, *extra], world_size=world)


def num_microbatches(args) -> int:
    return args.global_batch_size // (args.micro_batch_size * args.data_parallel_size)


def test_every_recipe_is_covered():
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIGS, "*.yaml")))
    assert found == sorted(RECIPES), "add new recipes to RECIPES with their intended world size"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_key_is_a_flag_of_the_loop(name):
    """Keys are the flags of Megatron-LM's loop and the --arra-* ones (not the old trainer's)."""
    flags = {option for action in build_parser()._actions for option in action.option_strings}
    with open(recipe_path(name)) as f:
        keys = yaml.safe_load(f)
    unknown = [key for key in keys if "--" + key not in flags]
    assert not unknown, f"{name}: not flags of pretrain_arra.py: {unknown}"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_is_consistent(parse, name, tmp_path):
    with open(recipe_path(name)) as f:
        text = f.read()
    keys = yaml.safe_load(text)
    assert text.startswith("#"), "each recipe starts with a comment header (source, what to change)"
    assert not {"data-path", "data_path", "mock-data", "mock_data"} & set(keys), "data paths stay out of recipes"

    args = parse_recipe(parse, name, tmp_path)
    world, _, image_tokens, min_condition = RECIPES[name]
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    assert tp * pp * args.data_parallel_size == world
    assert num_microbatches(args) * args.micro_batch_size * args.data_parallel_size == args.global_batch_size
    assert 1 <= args.arra_align_layer <= args.num_layers
    assert args.hidden_size % args.num_attention_heads == 0 and args.num_attention_heads % tp == 0
    assert args.num_layers % pp == 0
    if args.sequence_parallel:
        assert args.seq_length % tp == 0, "sequence parallelism splits the sequence over TP ranks"
    # A document of seq_length + 1 tokens gives seq_length input positions; the shortest
    # sample (frame tokens, image, smallest condition) must fit.
    assert args.seq_length + 1 >= NUM_FRAME_TOKENS + image_tokens + min_condition
    assert args.max_position_embeddings >= args.seq_length
    assert args.lr_warmup_iters < (args.lr_decay_iters or args.train_iters)
    # Megatron-Core's own checks on the model config (TransformerConfig.__post_init__).
    config = transformer_config(args)
    assert (config.num_layers, config.hidden_size, config.ffn_hidden_size) == (
        args.num_layers, args.hidden_size, args.ffn_hidden_size)
    assert config.gated_linear_unit == args.swiglu and config.add_bias_linear == args.add_bias_linear
    assert config.tensor_model_parallel_size == tp and config.sequence_parallel == args.sequence_parallel


@pytest.mark.parametrize("name", ["llamagen_b_c2i_imagenet256.yaml", "llamagen_l_c2i_imagenet256.yaml"])
def test_llamagen_c2i_recipes(parse, name, tmp_path):
    args = parse_recipe(parse, name, tmp_path)
    size = {"llamagen_b": (12, 768, 12), "llamagen_l": (24, 1024, 16)}[name[:10]]
    assert (args.num_layers, args.hidden_size, args.num_attention_heads) == size
    assert args.normalization == "RMSNorm" and args.swiglu and not args.add_bias_linear
    assert args.position_embedding_type == "rope" and args.untie_embeddings_and_output_weights
    assert args.micro_batch_size == 32  # the paper's batch 32 per GPU
    assert args.lr == 1e-4
    assert args.vocab_size >= 1000 + 16384 + 6  # classes + VQ-16 codes + special tokens
    assert args.seq_length >= 260
    assert (args.arra_align_layer, args.arra_weight, args.arra_objective, args.arra_target) == (1, 1.0, "cos", "hybnext")
    assert (args.arra_target_dim, args.arra_aggregation, args.arra_projector) == (512, "cls", "mlp")


def test_t2i_1b_recipe(parse, tmp_path):
    args = parse_recipe(parse, "t2i_1b_laion_coco.yaml", tmp_path)
    h, layers = args.hidden_size, args.num_layers
    block_params = layers * (4 * h * h + 3 * h * args.ffn_hidden_size)
    assert 0.9e9 < block_params < 1.5e9
    assert args.seq_length >= 256 + NUM_FRAME_TOKENS + 100  # room for a caption of ~120 tokens
    assert args.bf16 and args.use_distributed_optimizer
    assert args.arra_target_dim == 512 and args.arra_align_layer == 1


def test_chameleon_recipe_has_the_papers_settings(parse, tmp_path):
    args = parse_recipe(parse, "chameleon7b_mimic_cxr512.yaml", tmp_path)
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.ffn_hidden_size) == (32, 4096, 32, 11008)
    assert args.normalization == "RMSNorm" and args.qk_layernorm and args.swiglu
    assert args.vocab_size == 65536
    assert args.lr == pytest.approx(2e-5)
    assert args.weight_decay == pytest.approx(0.05)
    assert (args.adam_beta1, args.adam_beta2) == (0.9, 0.95)
    assert args.arra_z_loss_weight == pytest.approx(1e-5)
    assert args.arra_condition_dropout_prob == pytest.approx(0.1)
    assert args.qk_layernorm_per_head and transformer_config(args).qk_layernorm_per_head
    assert args.seq_length >= 1024 + NUM_FRAME_TOKENS
    assert args.arra_targets == "online" and "BiomedCLIP" in args.arra_encoder
    assert (args.arra_target_dim, args.arra_aggregation, args.arra_align_layer, args.arra_weight) == (512, "cls", 1, 1.0)
    assert args.bf16 and args.use_distributed_optimizer and args.sequence_parallel
    assert (args.tensor_model_parallel_size, args.data_parallel_size) == (4, 2)


def test_chameleon_alternative_layout_tp2_pp2(parse, tmp_path):
    """The TP2 x PP2 plan named in the recipe's header also validates; with virtual
    stages the header's batch of 8 gives a micro-batch count divisible by PP."""
    layout = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    args = parse_recipe(parse, "chameleon7b_mimic_cxr512.yaml", tmp_path, *layout)
    assert args.data_parallel_size == 2 and num_microbatches(args) == 3
    args = parse_recipe(parse, "chameleon7b_mimic_cxr512.yaml", tmp_path, *layout,
                        "--num-layers-per-virtual-pipeline-stage", "4", "--global-batch-size", "8")
    assert args.virtual_pipeline_model_parallel_size == 4
    assert num_microbatches(args) % args.pipeline_model_parallel_size == 0
    assert transformer_config(args).virtual_pipeline_model_parallel_size == 4


def write_dataset_manifest(prefix, profile: TokenizerProfile, max_seq_length: int, target_dim) -> None:
    """The files the argument checks read before any process group: PREFIX.bin/.idx and the
    manifest PREFIX.json with the tokenizer profile the builder would store for this data
    (``target_dim`` None: no precomputed targets, a dataset for online ones)."""
    for ext in (".bin", ".idx"):
        open(f"{prefix}{ext}", "wb").close()
    features = None if target_dim is None else FeatureTable(file="features.npy", num_rows=1, dim=target_dim,
                                                            encoder={}, aggregation="cls", preprocessing={})
    DatasetManifest(num_samples=1, token_dtype="int32", max_seq_length=max_seq_length, tokenizer_profile=profile,
                    files=DatasetFiles.named(os.path.basename(prefix)), counts=BuildCounts(samples=1),
                    builder_version="1").with_features(features).write(prefix)


VQ16 = ModelIdentity(kind="JanusVQVAE", path="/models/llamagen_vq16", sha256="0" * 64)
PREPROCESS = {"resize": 256, "crop": 256}
# Chameleon's one vocabulary (as conversion/chameleon.py writes its profile): image ids 4..8195 inside 65536.
CHAMELEON = TokenizerProfile(
    vocab_size=65536, text_vocab_size=65536, class_token_offset=65536, num_classes=0, image_token_offset=4,
    image_codebook_size=8192, special=SpecialTokens(bos=0, eos=2, pad=1, boi=8197, eoi=8196, null_condition=1),
    image_size=512, tokens_per_image=1024, image_preprocessing={"resize": 512, "crop": 512},
    vq_model=ModelIdentity(kind="ChameleonVQVAE", path="/checkpoints/chameleon-7b-mcore/vq_model", sha256="0" * 64))


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
def test_recipe_fits_its_dataset(parse, name, profile, longest, tmp_path):
    """With --data-path, the recipe's vocabulary, sequence length and target dimension
    pass the manifest checks for the dataset the recipe's header says to build."""
    prefix = str(tmp_path / "data")
    write_dataset_manifest(prefix, profile, longest, target_dim=512)
    world = RECIPES[name][0]
    args = parse(["--config", recipe_path(name), "--data-path", prefix, "--save", str(tmp_path / "ckpt")],
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
