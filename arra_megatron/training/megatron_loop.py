"""ARRA through Megatron-LM's own training loop (``megatron.training.pretrain``).

Megatron-LM's loop, flags, defaults, log line and checkpoint directory hold as
Megatron-LM defines them; ARRA enters the way Megatron-LM's own model families do:

* ``model_provider``: this project's GPT chunk (layer spec as ``models/specs.py`` picks it,
  padded logits masked) with the ARRA tap and projector on the chunk that holds layer k;
* ``datasets_provider``: the ARRA indexed datasets (blends and splits as Megatron-LM's
  ``--data-path`` / ``--split`` / ``--*-data-path``) or ``--mock-data``;
* ``forward_step``: ``training/forward_step.py`` (global denominators, dense sync-free tap);
* ``add_arguments``: the ``--arra-*`` flags and the project's own.

L_GVA is computed on the stage that holds layer k while megatron.training reports only what
the last stage's loss function returns, and it has no hook for a model's own metrics; so
``install_metric_hooks`` wraps its ``train_step`` and ``evaluate`` (collective points every
rank reaches) to add "gva loss" and "gva cos" to their loss dictionaries.

    torchrun --nproc-per-node 2 examples/pretrain_arra.py --mock-data --vocab-size 300 \\
        --num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 64 \\
        --max-position-embeddings 64 --micro-batch-size 2 --global-batch-size 8 --train-iters 10 \\
        --lr 1e-3 --tensor-model-parallel-size 2 --arra-align-layer 2 --arra-target-dim 32
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
from typing import Dict, List, Optional, Tuple

import torch

from arra_megatron.config import AGGREGATIONS, OBJECTIVES, PROJECTORS, TARGETS, ARRAConfig, ARRAConfigError
from arra_megatron.encoders import SPEC_HELP as ENCODER_SPEC_HELP

#: Settings the loop needs whatever the command line says.
ARGS_DEFAULTS = {"tokenizer_type": "NullTokenizer"}


# ----------------------------------------------------------------------------- arguments
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``extra_args_provider``: the ARRA flags (one per ARRAConfig field) and the project's own."""
    _escape_stray_percent(parser)
    parser.set_defaults(**project_defaults(parser))
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="YAML file whose keys are this program's flags without -- (e.g. 'num-layers: 24', "
                             "'swiglu: true', 'bias-swiglu-fusion: false'); the command line wins")
    g = parser.add_argument_group("ARRA")
    g.add_argument("--arra", action=argparse.BooleanOptionalAction, default=True,
                   help="the alignment loss (--no-arra: plain next-token training)")
    g.add_argument("--arra-align-layer", type=int, default=1, help="k: 1-based global layer aligned")
    g.add_argument("--arra-weight", type=float, default=1.0, help="lambda, the weight of L_GVA")
    g.add_argument("--arra-objective", choices=OBJECTIVES, default="cos")
    g.add_argument("--arra-target", choices=TARGETS, default="hybnext")
    g.add_argument("--arra-projector", choices=PROJECTORS, default="mlp")
    g.add_argument("--arra-target-dim", type=int, help="D, the dimension of f_GF (default: the dataset's "
                   "feature table; 512 with --mock-data)")
    g.add_argument("--arra-aggregation", choices=AGGREGATIONS, default="cls")
    g.add_argument("--arra-targets", choices=["precomputed", "online"], default="precomputed",
                   help="f_GF from the dataset's feature table, or computed during training by --arra-encoder "
                        "on the stage holding layer k")
    g.add_argument("--arra-encoder", help=f"frozen target encoder for --arra-targets online: {ENCODER_SPEC_HELP}")
    g.add_argument("--arra-z-loss-weight", type=float, default=0.0, help="z-loss weight (1e-5 in the paper's 7B runs)")
    g.add_argument("--arra-condition-dropout-prob", type=float, default=0.0,
                   help="drop the condition of this fraction of samples (classifier-free guidance)")
    g.add_argument("--arra-loss-on-text", action=argparse.BooleanOptionalAction, default=False,
                   help="also count text targets in L_AR")
    g.add_argument("--log-json", metavar="PATH",
                   help="one JSON object per iteration and per evaluation (the tools read it); the values "
                        "are read from the device at each --log-interval")
    g.add_argument("--qk-layernorm-per-head", action=argparse.BooleanOptionalAction, default=False,
                   help="Chameleon's q/k norm over each head's channels")
    return parser


@dataclasses.dataclass
class DataLayout:
    """What the model and the loss need to know about the data before it is built."""

    vocab_size: int                        # ids the tokenizer produces (logits above are masked)
    image_token_range: Tuple[int, int]
    target_dim: Optional[int] = None       # D of the feature table


def _escape_stray_percent(parser: argparse.ArgumentParser) -> None:
    """megatron-core 0.19.2 writes a bare "%" in a help text (--moe-paged-stash-buffer-size-factor-cuda,
    "e.g. 1.10 = 10%)"), which makes argparse's --help raise; escape the ones that are not
    argparse's own ``%(name)s``."""
    for action in parser._actions:
        if action.help and "%" in action.help:
            action.help = re.sub(r"%(\(\w+\)[sdrfg]|%)?", lambda m: m.group(0) if m.group(1) else "%%",
                                 action.help)


#: Megatron-Core 0.19's flags without a usable default: ``--eval-interval`` None makes
#: ``get_train_valid_test_num_samples`` divide by None; 1000 is Megatron-LM's long-standing default.
DEFAULTS = {"eval_interval": 1000}
#: What a CPU-mode process cannot use (no NCCL, no Transformer Engine, no CUDA fusion kernels);
#: defaults only, so a flag on the command line still wins.
CPU_MODE_DEFAULTS = {
    "distributed_backend": "gloo", "transformer_impl": "local", "gradient_accumulation_fusion": False,
    "bias_swiglu_fusion": False, "bias_gelu_fusion": False, "bias_dropout_fusion": False,
    "apply_rope_fusion": False, "masked_softmax_fusion": False, "no_persist_layer_norm": True,
}


def project_defaults(parser: argparse.ArgumentParser) -> dict:
    from arra_megatron.runtime import cpu_mode

    dests = {action.dest: action.default for action in parser._actions}
    defaults = {k: v for k, v in DEFAULTS.items() if k in dests and dests[k] is None}
    if cpu_mode.is_enabled():
        defaults.update({k: v for k, v in CPU_MODE_DEFAULTS.items() if k in dests})
    return defaults


def build_parser() -> argparse.ArgumentParser:
    """Megatron-LM's parser with this project's flags (what ``--help`` and ``--config`` know)."""
    from megatron.training.arguments import add_megatron_arguments

    parser = argparse.ArgumentParser(prog="pretrain_arra.py", allow_abbrev=False)
    return add_arguments(add_megatron_arguments(parser))


#: Keys of recipes written for the trainer before it moved onto Megatron-LM's loop.
RENAMED_KEYS = {"z_loss_weight": "arra-z-loss-weight", "condition_dropout_prob": "arra-condition-dropout-prob",
                "loss_on_text": "arra-loss-on-text"}


class ConfigError(ValueError):
    """A ``--config`` file that does not fit the flags; the message names the key."""


def expand_config(argv: List[str], parser: Optional[argparse.ArgumentParser] = None) -> List[str]:
    """``--config FILE.yaml`` replaced by the flags it holds, placed before the rest of the command
    line so that a flag given there wins (argparse keeps the last value)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(argv)
    if not known.config:
        return list(argv)
    import yaml

    path = known.config
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values")
    parser = parser or build_parser()
    by_name: Dict[str, list] = {}
    for action in parser._actions:  # a key is a flag's name ("disable-bias-linear") or its dest ("bias_swiglu_fusion")
        for option in action.option_strings:
            by_name.setdefault(option.lstrip("-").replace("-", "_"), []).insert(0, action)
        by_name.setdefault(action.dest, []).append(action)
    flags: List[str] = []
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name in RENAMED_KEYS:
            raise ConfigError(f"--config {path}: {key!r} is now {RENAMED_KEYS[name]!r}")
        flags += _config_flags(path, key, value, by_name.get(name, []))
    return flags + rest


def _config_flags(path: str, key, value, actions: list) -> List[str]:
    """The command-line form of one YAML entry."""
    if not actions or actions[0].dest in ("config", "help"):
        raise ConfigError(f"--config {path}: unknown key {key!r} (keys are this program's flags)")
    switches = [a for a in actions if a.nargs == 0]
    if switches:
        if not isinstance(value, bool):
            raise ConfigError(f"--config {path}: {key} is a switch; give true or false, not {value!r}")
        first = switches[0]
        if isinstance(first, argparse.BooleanOptionalAction):
            return [("--" if value else "--no-") + first.option_strings[0].lstrip("-")]
        if str(key).lstrip("-").replace("_", "-") in [o.lstrip("-") for o in first.option_strings]:
            return [first.option_strings[0]] if value else []  # the flag named: true gives it, false leaves it out
        for action in switches:
            if action.const == value:
                return [action.option_strings[0]]
        if value == first.default:
            return []  # already the default; there is no flag that sets it
        raise ConfigError(f"--config {path}: no flag sets {key} to {value}")
    action = actions[0]
    values = value if isinstance(value, list) else (str(value).split() if action.nargs in ("+", "*") else [value])
    if value is None:
        return []
    return [action.option_strings[0]] + [str(v) for v in values]


def data_layout(args: argparse.Namespace) -> DataLayout:
    """From the dataset manifests (or the mock's rules); read on every rank before any work."""
    if args.mock_data:
        if not args.vocab_size:
            raise SystemExit("--mock-data needs --vocab-size")
        from arra_megatron.data.mock import mock_image_token_range

        return DataLayout(args.vocab_size, mock_image_token_range(args.vocab_size))
    from arra_megatron.data.checks import data_prefixes, named_data_paths
    from arra_megatron.data.dataset import read_layout

    named = named_data_paths(vars(args))
    if not named:
        raise SystemExit("give --data-path (or --train-data-path ...) or --mock-data")
    prefixes = []
    for flag, path in named:
        for prefix in data_prefixes(path, flag):
            if not os.path.isfile(prefix + ".json"):
                raise SystemExit(f"{flag} {prefix}: no dataset there (no {prefix}.json; build it with "
                                 "tools/build_indexed_dataset.py)")
            prefixes.append(prefix)
    profile, target_dim = read_layout(prefixes)
    # A larger --vocab-size reserves ids (a later dataset's); a smaller one fails in check_data_flags.
    vocab_size = max(profile.vocab_size, args.vocab_size or 0)
    return DataLayout(vocab_size, tuple(profile.image_token_range), target_dim)


def early_layout(argv=None) -> DataLayout:
    """The data layout from the data flags alone: Megatron's argument parsing already builds the
    tokenizer, which needs the vocabulary size (``--vocab-size``, default: the datasets')."""
    parser = argparse.ArgumentParser(add_help=False)
    for flag in ("--data-path", "--train-data-path", "--valid-data-path", "--test-data-path"):
        parser.add_argument(flag, nargs="*")
    parser.add_argument("--mock-data", action="store_true")
    parser.add_argument("--vocab-size", type=int)
    early, _ = parser.parse_known_args(argv)
    if not early.mock_data and not any((early.data_path, early.train_data_path)):
        return DataLayout(early.vocab_size or 0, (0, 0))  # --help, or Megatron names what is missing
    return data_layout(early)


def prepare_args(args: argparse.Namespace, layout: DataLayout) -> DataLayout:
    """Project rules on top of Megatron-LM's validation; fails before any work, naming the flag."""
    from arra_megatron.data.checks import check_data_flags

    online = args.arra and args.arra_targets == "online"
    if not 0.0 <= args.arra_condition_dropout_prob <= 1.0:
        raise SystemExit("--arra-condition-dropout-prob must be in [0, 1] (1 trains an unconditional model); got "
                         f"{args.arra_condition_dropout_prob}")
    if args.qk_layernorm_per_head and not args.qk_layernorm:
        raise SystemExit("--qk-layernorm-per-head needs --qk-layernorm")
    if online:
        if args.mock_data:
            raise SystemExit("--arra-targets online reads the images of a dataset; it does not go with --mock-data")
        if not args.arra_encoder:
            raise SystemExit("--arra-targets online needs --arra-encoder")
        try:
            from arra_megatron.encoders import parse_encoder_spec

            parse_encoder_spec(args.arra_encoder)
        except ValueError as err:
            raise SystemExit(f"--arra-encoder: {err}") from None
        if args.arra_target_dim is None:
            args.arra_target_dim = online_encoder_dim(args)
    if args.arra_target_dim is None:
        args.arra_target_dim = layout.target_dim or 512
    if getattr(args, "context_parallel_size", 1) > 1 and args.arra:
        raise SystemExit("ARRA does not support --context-parallel-size > 1 (L_GVA would need a CP reduction)")

    def check_encoder_dim(encoder_dim=None, layout_has_images=True):
        arra_config(args).validate_for_model(num_layers=args.num_layers, hidden_size=args.hidden_size,
                                             tensor_model_parallel_size=args.tensor_model_parallel_size,
                                             encoder_dim=encoder_dim if args.arra else None,
                                             layout_has_images=layout_has_images)

    try:
        check_encoder_dim()
        check_data_flags(args, check_encoder_dim)
    except (ARRAConfigError, ValueError) as err:
        raise SystemExit(str(err)) from None
    for flag, root in (("--load", args.load), ("--pretrained-checkpoint", args.pretrained_checkpoint)):
        check_checkpoint_dir(flag, root)
    return layout


def check_checkpoint_dir(flag: str, root: Optional[str]) -> None:
    """A checkpoint written by the project's trainer before Megatron-LM's loop fails here with the
    command that converts it; iteration directories newer than the tracker (a save that did not
    finish) are named, since Megatron-LM skips them silently."""
    import glob

    from arra_megatron.training import checkpoints

    if not root or not os.path.isfile(os.path.join(root, checkpoints.TRACKER_FILE)):
        return
    try:
        path = checkpoints.resolve(root)
    except checkpoints.CheckpointError as err:
        raise SystemExit(f"{flag}: {err}") from None
    latest = os.path.basename(path)
    if int(os.environ.get("RANK", "0")) == 0 and latest.startswith("iter_"):
        for newer in sorted(glob.glob(os.path.join(root, "iter_*"))):
            if os.path.basename(newer) > latest:
                print(f"WARNING: {flag} {root}: ignoring incomplete checkpoint {newer} ({checkpoints.TRACKER_FILE} "
                      f"names {latest}: that save did not finish)", flush=True)


def check_flags(args: argparse.Namespace) -> None:
    """Mistakes that Megatron-LM's validation would catch with a bare or misleading assertion, or
    only after the process groups exist: checked first, each message naming the flag."""
    if args.mock_data and (args.data_path or args.train_data_path):
        raise SystemExit("--mock-data and --data-path / --train-data-path are exclusive; give one")
    if (args.valid_data_path or args.test_data_path) and not args.train_data_path:
        raise SystemExit("--valid-data-path and --test-data-path go with --train-data-path (with --data-path, "
                         "--split carves the held-out sets out of it)")
    if args.lr is None:
        raise SystemExit("--lr is required (the peak learning rate)")
    if args.bf16 and args.fp16:
        raise SystemExit("--bf16 and --fp16 are exclusive; choose one")
    if args.min_lr > args.lr:
        raise SystemExit(f"--min-lr {args.min_lr} is above --lr {args.lr}")
    decay = args.lr_decay_iters or args.train_iters
    if decay and args.lr_warmup_iters and args.lr_warmup_iters >= decay:
        raise SystemExit(f"--lr-warmup-iters {args.lr_warmup_iters} must be below --lr-decay-iters {decay} "
                         "(default: --train-iters)")
    tp = args.tensor_model_parallel_size
    if args.sequence_parallel and tp > 1 and args.seq_length and args.seq_length % tp:
        raise SystemExit(f"--sequence-parallel splits --seq-length {args.seq_length} over "
                         f"--tensor-model-parallel-size {tp}: it must divide evenly")
    if args.num_attention_heads and args.num_attention_heads % tp:
        raise SystemExit(f"--num-attention-heads {args.num_attention_heads} is not divisible by "
                         f"--tensor-model-parallel-size {tp}")
    if args.fp8:
        from arra_megatron.runtime.capabilities import require_fp8_support

        try:
            require_fp8_support("--fp8-format", args.fp8_recipe)
        except RuntimeError as err:
            raise SystemExit(str(err)) from None
        if args.transformer_impl == "local":
            raise SystemExit("--fp8-format runs through Transformer Engine layers; drop --transformer-impl local")


def online_encoder_dim(args: argparse.Namespace) -> int:
    """D of ``--arra-encoder`` (loaded on the CPU once, before any work)."""
    from arra_megatron.encoders import load_encoder

    try:
        return load_encoder(args.arra_encoder, args.arra_aggregation, device=torch.device("cpu")).dim
    except (ValueError, FileNotFoundError, ImportError) as err:
        raise SystemExit(f"--arra-encoder {args.arra_encoder}: {err}") from None


def arra_config(args: argparse.Namespace) -> ARRAConfig:
    return ARRAConfig(enabled=args.arra, align_layer=args.arra_align_layer, weight=args.arra_weight,
                      objective=args.arra_objective, target=args.arra_target, projector=args.arra_projector,
                      target_dim=args.arra_target_dim, aggregation=args.arra_aggregation)


# ----------------------------------------------------------------------------- run state
class _Run:
    """Per-process state shared by the providers (pretrain calls them without context)."""

    layout: Optional[DataLayout] = None
    config = None
    tap = None
    step = None
    online_targets = None
    json_log: Optional["JsonLog"] = None


def transformer_config(args: argparse.Namespace):
    """Megatron-LM's TransformerConfig from its arguments (``core_transformer_config_from_args``) with
    this project's switches (``ARRATransformerConfig``): the one mapping from flags to the model, used
    by training, conversion and sampling alike."""
    from megatron.training.argument_utils import core_transformer_config_from_args

    from arra_megatron.models.norms import ARRATransformerConfig
    from arra_megatron.runtime import cpu_mode

    config = core_transformer_config_from_args(args, config_class=ARRATransformerConfig)
    cpu_mode.configure(config)
    return config


def layer_backend(args: argparse.Namespace):
    """``--transformer-impl local`` asks for Megatron-Core's local layers where TE would be the default."""
    from arra_megatron.models.specs import default_backend

    return "local" if args.transformer_impl == "local" and default_backend() == "te" else default_backend()


def build_gpt(args: argparse.Namespace, config, vocab_rows: int, real_vocab_size: int, backend=None, **chunk):
    """The GPT chunk Megatron-LM's arguments ``args`` describe (``chunk``: vp_stage, pre_process,
    post_process, pg_collection); ``vocab_rows`` already padded, logits above ``real_vocab_size`` masked."""
    from arra_megatron.models.gpt import build_gpt_chunk

    return build_gpt_chunk(config, vocab_rows, args.max_position_embeddings, backend=backend or layer_backend(args),
                           position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
                           share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                           real_vocab_size=real_vocab_size, **chunk)


def padded_vocab_size(args) -> int:
    from arra_megatron.models.gpt import pad_vocab_size

    return pad_vocab_size(_Run.layout.vocab_size, args.tensor_model_parallel_size, args.make_vocab_size_divisible_by)


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None,
                   config=None, pg_collection=None):
    """One GPT chunk; the chunk that holds layer k carries the ARRA projector."""
    from megatron.training import get_args

    from arra_megatron.alignment.tap import ARRATap, find_layer

    args = get_args()
    if _Run.config is None:  # one config for every chunk: the schedules read model[0]'s
        _Run.config = transformer_config(args)
    config = _Run.config
    backend = layer_backend(args)
    gpt = build_gpt(args, config, padded_vocab_size(args), _Run.layout.vocab_size, backend=backend,
                    vp_stage=vp_stage, pre_process=pre_process, post_process=post_process,
                    pg_collection=pg_collection)
    arra = arra_config(args)
    if not arra.enabled:
        return gpt
    if _Run.tap is None:  # on every rank (the forward step asks it whether it holds layer k)
        _Run.tap = ARRATap(arra, config, seed=args.seed, te_linear=backend == "te")
    if find_layer([gpt], arra.align_layer) is None:
        return gpt
    if args.arra_targets == "online" and _Run.online_targets is None:  # f_GF where L_GVA is computed
        from arra_megatron.training.targets import OnlineTargets

        _Run.online_targets = OnlineTargets(args.arra_encoder, args.arra_aggregation, args.micro_batch_size,
                                            bf16=True)
    (chunk,) = _Run.tap.attach([gpt])
    return chunk


# ----------------------------------------------------------------------------- data
def datasets_provider(train_val_test_num_samples, vp_stage: Optional[int] = None):
    """(train, valid, test) on the ranks whose chunks read data: the first stage (tokens), the
    last (labels, loss mask) and the one holding layer k (labels, targets); None elsewhere."""
    from megatron.core import parallel_state
    from megatron.training import get_args

    args = get_args()
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    holds = _Run.tap is not None and _Run.tap.holds_layer and _Run.tap.vp_stage == vp_stage
    if not (first or last or holds):
        return None, None, None
    sizes = [int(n or 0) for n in train_val_test_num_samples]
    if args.mock_data:
        from arra_megatron.data.mock import MockARRADataset, MockSplit

        mock = MockARRADataset(_Run.layout.vocab_size, args.seq_length, args.arra_target_dim, seed=args.seed,
                               loss_on_text=args.arra_loss_on_text)
        # A split nothing asks for (--eval-iters 0, a test split of 0) is None: Megatron then builds no loader.
        return tuple(MockSplit(mock, split, n) if n else None for split, n in enumerate(sizes))
    from arra_megatron.data.dataset import build_arra_datasets

    per_split = [args.train_data_path, args.valid_data_path, args.test_data_path] if args.train_data_path else None
    datasets, _ = build_arra_datasets(
        args.data_path, args.split, args.seq_length, args.seed, sizes, per_split=per_split,
        condition_dropout_prob=args.arra_condition_dropout_prob, loss_on_text=args.arra_loss_on_text,
        with_features=args.arra and args.arra_targets == "precomputed",
        with_images=args.arra and args.arra_targets == "online")
    return tuple(dataset if n else None for dataset, n in zip(datasets, sizes))


datasets_provider.is_distributed = True  # every rank builds what its chunks read (no TP broadcast)


# ----------------------------------------------------------------------------- forward step
def arra_forward_step():
    """The loop's forward step (``training/forward_step.py``), built once per process on first use;
    callers that drive the schedule themselves may hold it before any step."""
    if _Run.step is None:
        from megatron.training import get_args

        from arra_megatron.training.forward_step import ARRAForwardStep

        args = get_args()
        _Run.step = ARRAForwardStep(arra_config(args), _Run.layout.image_token_range, _Run.tap,
                                    z_loss_weight=args.arra_z_loss_weight,
                                    per_token_loss=args.calculate_per_token_loss,
                                    online_targets=_Run.online_targets)
    return _Run.step


def forward_step(data_iterator, model):
    return arra_forward_step()(data_iterator, model)


def arra_tap():
    """This process's ARRA tap (None with --no-arra or before the model is built)."""
    return _Run.tap


def data_layout_in_use() -> Optional[DataLayout]:
    return _Run.layout


def reset() -> None:
    """Forget the loop's per-process state (a process that builds one run after another)."""
    for name in ("layout", "config", "tap", "step", "online_targets", "json_log"):
        setattr(_Run, name, None)


# ----------------------------------------------------------------------------- metrics
def install_load_hook() -> None:
    """Fine-tuning with ARRA from a checkpoint without a projector (an imported Hugging Face model, a
    --no-arra run): the projector starts from its initialisation instead of failing the load. Wraps
    ``training.py``'s ``load_checkpoint`` (megatron-core 0.19)."""
    import megatron.training.training as training

    original = training.load_checkpoint
    if getattr(original, "_arra_fresh_projector", False):
        return

    @functools.wraps(original)
    def load_checkpoint(model, *args, **kwargs):
        from megatron.training import get_args
        from megatron.core.utils import unwrap_model

        from arra_megatron.alignment.tap import ARRAModelChunk
        from arra_megatron.training import checkpoints

        margs = get_args()
        holders = [m for m in unwrap_model(model) if isinstance(m, ARRAModelChunk)]
        root = next((r for r in (margs.load, margs.pretrained_checkpoint)
                     if r and os.path.isfile(os.path.join(r, checkpoints.TRACKER_FILE))), None)
        path = checkpoints.resolve(root) if root and holders else None
        fresh = path is not None and not checkpoints.has_projector(path)
        if fresh and not (margs.finetune or os.path.basename(path) == "release" or root != margs.load):
            raise SystemExit(f"{path} has no ARRA projector (a --no-arra run or an imported model): start ARRA "
                             "from it with --finetune, or train on with --no-arra")
        if fresh:
            print(f"{path} has no ARRA projector: it starts from its initialisation", flush=True)
        for holder in holders:
            holder.projector_in_checkpoint = not fresh
        try:
            return original(model, *args, **kwargs)
        finally:
            for holder in holders:
                holder.projector_in_checkpoint = True

    load_checkpoint._arra_fresh_projector = True
    training.load_checkpoint = load_checkpoint


def install_metric_hooks() -> None:
    """Add "gva loss" and "gva cos" to megatron.training's loss dictionaries; ``--log-json``.

    Wraps ``train_step``, ``evaluate`` and ``evaluate_and_print_results`` of megatron-core
    0.19's ``training.py`` (the version CPU mode checks): after a step or an evaluation,
    ``ARRAForwardStep.alignment_metrics`` reduces the tap's sums over TP (sequence parallel),
    PP and DP, and the last stage adds them to the dictionary Megatron logs.
    """
    import megatron.training.training as training

    if getattr(training.train_step, "_arra_metrics", False):
        return
    original_train_step, original_evaluate = training.train_step, training.evaluate
    original_evaluate_and_print = training.evaluate_and_print_results

    @functools.wraps(original_train_step)
    def train_step(*args, **kwargs):
        out = original_train_step(*args, **kwargs)
        loss_dict = out[0]
        if _Run.step is not None and _Run.step.tap is not None:
            _merge(loss_dict, _Run.step.alignment_metrics())
        if _Run.json_log is not None and loss_dict:
            optimizer = args[3] if len(args) > 3 else kwargs["optimizer"]
            _Run.json_log.train(kwargs.get("iteration", 0) + 1, loss_dict, skipped=out[1], grad_norm=out[5],
                                lr=optimizer.param_groups[0]["lr"], loss_scale=optimizer.get_loss_scale())
        return out

    @functools.wraps(original_evaluate)
    def evaluate(*args, **kwargs):
        total, non_loss, timelimit = original_evaluate(*args, **kwargs)
        if not timelimit and _Run.step is not None and _Run.step.tap is not None:
            _merge(total, _Run.step.alignment_metrics())
        if not timelimit and _Run.json_log is not None and total:
            _Run.json_log.evaluation(total)
        return total, non_loss, timelimit

    @functools.wraps(original_evaluate_and_print)
    def evaluate_and_print_results(prefix, *args, **kwargs):
        if _Run.json_log is not None:  # which split and iteration the coming evaluation is for
            iteration = args[3] if len(args) > 3 else kwargs["iteration"]
            _Run.json_log.evaluating("test" if "test" in prefix else "valid", iteration)
        return original_evaluate_and_print(prefix, *args, **kwargs)

    train_step._arra_metrics = True
    training.train_step, training.evaluate = train_step, evaluate
    training.evaluate_and_print_results = evaluate_and_print_results


def _merge(loss_dict, metrics) -> None:
    if loss_dict:  # the last stage's dictionary; empty elsewhere
        for key, value in metrics.items():
            loss_dict[key] = value.float().reshape(1)


class JsonLog:
    """``--log-json``: one JSON object per iteration (and per evaluation, with ``"split"``),
    written by the last rank. Values stay on the device until the ``--log-interval`` flush."""

    def __init__(self, path: str, log_interval: int):
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")
        self.log_interval = max(log_interval, 1)
        self.pending: list = []
        self.split, self.iteration = "valid", 0

    def train(self, iteration: int, loss_dict, **extra) -> None:
        from megatron.core.num_microbatches_calculator import get_current_global_batch_size
        from megatron.training import get_args

        consumed = get_args().consumed_train_samples + get_current_global_batch_size()
        self.pending.append(({"iteration": iteration, "consumed_samples": consumed}, dict(loss_dict), extra))
        if iteration % self.log_interval == 0:
            self.flush()

    def evaluating(self, split: str, iteration: int) -> None:
        self.split, self.iteration = split, iteration

    def evaluation(self, totals) -> None:
        self.pending.append(({"iteration": self.iteration, "split": self.split}, dict(totals), {}))
        self.flush()

    def flush(self) -> None:
        for head, values, extra in self.pending:
            record = dict(head)
            record.update({key.replace(" ", "_"): _number(value) for key, value in values.items()})
            record.update({key: _number(value) for key, value in extra.items()})
            self.file.write(json.dumps(record) + "\n")
        self.pending.clear()
        self.file.flush()


def _number(value):
    if isinstance(value, torch.Tensor):
        return value.double().sum().item()
    return value


# ----------------------------------------------------------------------------- main
def parse_args(argv: Optional[List[str]] = None) -> Tuple[argparse.Namespace, DataLayout]:
    """Megatron-LM's parsing and validation (``parse_and_validate_args`` without setting its
    globals) with ``--config`` expanded and the project's rules; any error exits before work starts,
    naming the flag."""
    import sys
    from unittest import mock

    from megatron.training import arguments as megatron_arguments

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = expand_config(argv)
    except ConfigError as err:
        raise SystemExit(f"pretrain_arra.py: error: {err}") from None
    layout = early_layout(argv)
    defaults = {**ARGS_DEFAULTS, **({"vocab_size": layout.vocab_size} if layout.vocab_size else {})}
    with mock.patch.object(sys, "argv", [sys.argv[0]] + argv):
        args = megatron_arguments.parse_args(add_arguments)
    if args.use_checkpoint_args:
        from megatron.training.checkpointing import load_args_from_checkpoint

        load_args_from_checkpoint(args)
    check_flags(args)
    megatron_arguments.validate_args(args, defaults)
    return args, prepare_args(args, layout)


def setup(argv: Optional[List[str]] = None, layout: Optional[DataLayout] = None) -> argparse.Namespace:
    """Everything before ``pretrain``: CPU mode and its patches, a world of one without torchrun,
    the arguments checked and set as megatron.training's globals, the data layout kept for the
    providers (``layout`` overrides the one the data flags give). Also used by tools and tests
    that build the run's model outside ``pretrain``."""
    from megatron.training.global_vars import set_global_variables

    from arra_megatron.runtime import cpu_mode, megatron_training

    cpu_mode.maybe_enable_cpu_mode()
    megatron_training.install()
    _single_process_env()
    args, _Run.layout = parse_args(argv)
    if layout is not None:
        _Run.layout = layout
    set_global_variables(args)
    return args


def main(argv=None) -> None:
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    from arra_megatron.runtime import faults

    args = setup(argv)
    if args.log_json and int(os.environ["RANK"]) == int(os.environ["WORLD_SIZE"]) - 1:  # the last stage
        import atexit

        _Run.json_log = JsonLog(args.log_json, args.log_interval)
        atexit.register(_Run.json_log.flush)  # the iterations after the last --log-interval multiple
    install_metric_hooks()
    install_load_hook()
    faults.install_megatron_fail_point()
    pretrain(pretrain_cfg_container_from_args(args), datasets_provider, ModelType.encoder_or_decoder,
             forward_step, model_provider=model_provider)


def _single_process_env() -> None:
    """A plain ``python examples/pretrain_arra.py ...`` is a world of one (torchrun sets these)."""
    if "WORLD_SIZE" not in os.environ:
        from arra_megatron.runtime.launch import free_port

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))


if __name__ == "__main__":  # dist checkpointing spawns processes: the guard is required
    main()
