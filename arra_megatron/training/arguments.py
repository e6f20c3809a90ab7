"""Command-line arguments: Megatron-LM's flag names, the ``--arra-*`` flags, and ``--config FILE.yaml``.

Everything is validated before any process group is created: a wrong or
conflicting setting exits with a message that names the flag to change.
"""

from __future__ import annotations

import argparse
import os
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import yaml

from arra_megatron.config import AGGREGATIONS, OBJECTIVES, PROJECTORS, TARGETS, ARRAConfig, ARRAConfigError
from arra_megatron.encoders import SPEC_HELP as ENCODER_SPEC_HELP
from arra_megatron.encoders import parse_encoder_spec


class ArgumentError(ValueError):
    """A wrong command-line setting; the message names the flag."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line naming the problem, not the whole usage block (there are ~90 flags)."""
        self.exit(2, f"{self.prog}: error: {message}\n(run with --help to list the flags)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="pretrain_arra.py",
        description="ARRA pretraining on Megatron-Core (launch with torchrun).",
        allow_abbrev=False,
    )
    p.add_argument("--config", metavar="FILE.yaml",
                   help="YAML file whose keys are these flags (without --); the command line wins")

    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, required=False)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--ffn-hidden-size", type=int, help="default 4 x hidden size")
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--group-query-attention", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--num-query-groups", type=int, default=1)
    g.add_argument("--kv-channels", type=int)
    g.add_argument("--seq-length", type=int)
    g.add_argument("--max-position-embeddings", type=int)
    g.add_argument("--position-embedding-type", choices=["rope", "learned_absolute"], default="learned_absolute")
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--disable-bias-linear", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--qk-layernorm", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--qk-layernorm-per-head", action=argparse.BooleanOptionalAction, default=False,
                   help="with --qk-layernorm: a LayerNorm (weight and bias) per query/key head, split over TP "
                        "by heads, as Chameleon's q/k norms (instead of one weight shared by all heads in the "
                        "model's --normalization)")
    g.add_argument("--untie-embeddings-and-output-weights", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--vocab-size", type=int, help="vocabulary size for --mock-data (datasets carry their own)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int)
    g.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--use-distributed-optimizer", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--overlap-grad-reduce", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0)

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int)
    g.add_argument("--global-batch-size", type=int)
    g.add_argument("--train-iters", type=int)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--recompute-granularity", choices=["full", "selective"])
    g.add_argument("--recompute-method", choices=["uniform", "block"])
    g.add_argument("--recompute-num-layers", type=int)
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--loss-scale", type=float, help="static fp16 loss scale (default: dynamic)")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32)
    g.add_argument("--fp8-format", choices=["e4m3", "hybrid"],
                   help="train the GPT layers and the ARRA projector in FP8 (Transformer Engine, GPU)")
    g.add_argument("--fp8-recipe", choices=["delayed", "tensorwise", "mxfp8"], default="delayed")
    g.add_argument("--fp8-margin", type=int, default=0, help="delayed scaling: scaling-factor margin")
    g.add_argument("--fp8-amax-history-len", type=int, default=1, help="delayed scaling: amax history length")
    g.add_argument("--fp8-amax-compute-algo", choices=["most_recent", "max"], default="most_recent",
                   help="delayed scaling: amax from the most recent step or the history's max")
    g.add_argument("--transformer-impl", choices=["transformer_engine", "local"],
                   help="GPT layer implementation on GPU (default: transformer_engine when it is installed; "
                        "CPU mode always uses its own spec)")

    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("--optimizer", choices=["adam", "sgd"], default="adam", help="adam is AdamW (decoupled decay)")
    g.add_argument("--lr", type=float)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="linear")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, help="default --train-iters")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", help="PREFIX, or weighted blend 'W1 PREFIX1 W2 PREFIX2 ...'")
    g.add_argument("--split", default="969,30,1", help="train,valid,test proportions of --data-path")
    g.add_argument("--train-data-path", nargs="+",
                   help="instead of --data-path and --split: the training datasets (PREFIX or 'W1 P1 W2 P2 ...'), "
                        "with --valid-data-path / --test-data-path for independent held-out sets (Megatron-LM)")
    g.add_argument("--valid-data-path", nargs="+", help="with --train-data-path: the validation datasets")
    g.add_argument("--test-data-path", nargs="+", help="with --train-data-path: the test datasets")
    g.add_argument("--mock-data", action=argparse.BooleanOptionalAction, default=False, help="synthetic ARRA samples (no --data-path)")
    g.add_argument("--num-workers", type=int, default=2,
                   help="data-loader processes per rank that read and assemble micro-batches ahead (0: none)")
    g.add_argument("--condition-dropout-prob", type=float, default=0.0,
                   help="replace the condition with the null condition with this probability (CFG training)")
    g.add_argument("--loss-on-text", action=argparse.BooleanOptionalAction, default=False, help="also count text targets in L_AR")

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save")
    g.add_argument("--load")
    g.add_argument("--save-interval", type=int)
    g.add_argument("--exit-interval", type=int,
                   help="stop (after saving) when the iteration count is a multiple of this")
    g.add_argument("--finetune", action=argparse.BooleanOptionalAction, default=False,
                   help="load weights only: fresh optimizer, scheduler and iteration count")
    g.add_argument("--no-load-optim", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--no-load-rng", action=argparse.BooleanOptionalAction, default=False)

    g = p.add_argument_group("validation and logging")
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--tensorboard-dir")
    g.add_argument("--log-json", metavar="PATH", help="one JSON object per iteration (and per evaluation)")

    g = p.add_argument_group("ARRA")
    g.add_argument("--arra", action=argparse.BooleanOptionalAction, default=True,
                   help="the global visual alignment term (--no-arra: plain next-token training)")
    g.add_argument("--arra-align-layer", type=int, default=1, help="k: 1-based global layer aligned")
    g.add_argument("--arra-weight", type=float, default=1.0, help="lambda, the weight of L_GVA")
    g.add_argument("--arra-objective", choices=OBJECTIVES, default="cos")
    g.add_argument("--arra-target", choices=TARGETS, default="hybnext")
    g.add_argument("--arra-projector", choices=PROJECTORS, default="mlp")
    g.add_argument("--arra-target-dim", type=int, default=512, help="D, the dimension of f_GF")
    g.add_argument("--arra-aggregation", choices=AGGREGATIONS, default="cls")
    g.add_argument("--arra-encoder", help=f"frozen target encoder for --arra-targets online: {ENCODER_SPEC_HELP}")
    g.add_argument("--arra-targets", choices=["precomputed", "online"], default="precomputed")
    g.add_argument("--z-loss-weight", type=float, default=0.0, help="z-loss weight (1e-5 in the paper's 7B runs)")
    return p


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _yaml_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    if not os.path.isfile(path):
        raise ArgumentError(f"--config {path}: no such file")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ArgumentError(f"--config {path}: expected a mapping of flag names to values")
    known = {a.dest: a for a in parser._actions}
    defaults = {}
    for key, value in data.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in known or dest in ("config", "help"):
            raise ArgumentError(f"--config {path}: unknown key {key!r} (keys are this program's flags)")
        action = known[dest]
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise ArgumentError(f"--config {path}: {_flag(dest)} is a switch; give true or false, not {value!r}")
        elif action.nargs in ("+", "*") and not isinstance(value, list):
            value = str(value).split()  # "data-path: W1 P1 W2 P2" or a single prefix
        if action.type is not None and value is not None:
            try:
                value = [action.type(v) for v in value] if isinstance(value, list) else action.type(value)
            except (TypeError, ValueError):
                raise ArgumentError(f"--config {path}: {_flag(dest)} expects {action.type.__name__}, "
                                    f"got {value!r}") from None
        if action.choices is not None and value not in action.choices:
            raise ArgumentError(f"--config {path}: {_flag(dest)} must be one of {list(action.choices)}; got {value!r}")
        defaults[dest] = value
    return defaults


def parse_args(argv: Optional[Sequence[str]] = None, world_size: Optional[int] = None) -> argparse.Namespace:
    """Parse and validate. Exits (code 2) with a message naming the flag on any error."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    try:
        if pre.config:
            parser.set_defaults(**_yaml_defaults(parser, pre.config))
        args = parser.parse_args(argv)
        world_size = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
        validate_args(args, world_size)
    except (ArgumentError, ARRAConfigError) as err:
        parser.error(str(err))
    return args


def _required(args, names: List[str]) -> None:
    missing = [_flag(n) for n in names if getattr(args, n) is None]
    if missing:
        raise ArgumentError(f"missing required setting(s): {', '.join(missing)}")


def validate_args(args: argparse.Namespace, world_size: int) -> None:
    """Check every cross-flag rule; fill derived defaults (Megatron-LM's conventions)."""
    _required(args, ["num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
                     "global_batch_size", "train_iters", "lr"])
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if tp < 1 or pp < 1 or world_size % (tp * pp):
        raise ArgumentError(f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
                            f"--pipeline-model-parallel-size {pp}")
    args.data_parallel_size = world_size // (tp * pp)
    step = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size % step:
        raise ArgumentError(f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
                            f"{args.micro_batch_size} x data-parallel size {args.data_parallel_size}")
    args.num_microbatches = args.global_batch_size // step
    if args.hidden_size % args.num_attention_heads:
        raise ArgumentError(f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads "
                            f"{args.num_attention_heads}")
    if args.num_attention_heads % tp:
        raise ArgumentError(f"--num-attention-heads {args.num_attention_heads} is not divisible by "
                            f"--tensor-model-parallel-size {tp}")
    if not args.group_query_attention:
        args.num_query_groups = args.num_attention_heads
    if args.num_attention_heads % args.num_query_groups or args.num_query_groups % tp:
        raise ArgumentError(f"--num-query-groups {args.num_query_groups} must divide --num-attention-heads "
                            f"and be divisible by --tensor-model-parallel-size {tp}")
    if args.num_layers % pp:
        raise ArgumentError(f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size {pp}")
    args.virtual_pipeline_model_parallel_size = None
    if args.num_layers_per_virtual_pipeline_stage is not None:
        per_stage = args.num_layers // pp
        if pp < 2 or per_stage % args.num_layers_per_virtual_pipeline_stage:
            raise ArgumentError("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1 "
                                f"and must divide the {per_stage} layers of each pipeline stage")
        args.virtual_pipeline_model_parallel_size = per_stage // args.num_layers_per_virtual_pipeline_stage
        if args.num_microbatches % pp:
            raise ArgumentError(f"virtual pipeline stages need a number of micro-batches ({args.num_microbatches}) "
                                f"divisible by --pipeline-model-parallel-size {pp}; change --global-batch-size")
    if args.sequence_parallel and tp == 1:
        args.sequence_parallel = False  # as Megatron-LM: meaningless without TP
    if args.sequence_parallel and args.seq_length % tp:
        raise ArgumentError(f"--sequence-parallel splits --seq-length {args.seq_length} over "
                            f"--tensor-model-parallel-size {tp}: it must divide evenly")
    if args.bf16 and args.fp16:
        raise ArgumentError("--bf16 and --fp16 are exclusive; choose one")
    if args.transformer_impl == "transformer_engine":
        from arra_megatron.runtime.capabilities import has_transformer_engine

        if not has_transformer_engine():
            raise ArgumentError("--transformer-impl transformer_engine needs Transformer Engine and a GPU; "
                                "use --transformer-impl local or install TE (pip install 'arra-megatron[gpu]')")
    if args.fp8_format:
        from arra_megatron.runtime.capabilities import require_fp8_support

        if args.transformer_impl == "local":
            raise ArgumentError("--fp8-format runs through Transformer Engine layers; drop --transformer-impl local")
        try:
            require_fp8_support("--fp8-format", args.fp8_recipe)
        except RuntimeError as err:
            raise ArgumentError(str(err)) from None
    if args.qk_layernorm_per_head and not args.qk_layernorm:
        raise ArgumentError("--qk-layernorm-per-head needs --qk-layernorm")
    if args.recompute_granularity == "full" and (args.recompute_method is None or args.recompute_num_layers is None):
        raise ArgumentError("--recompute-granularity full needs --recompute-method and --recompute-num-layers")
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.seq_length > args.max_position_embeddings:
        raise ArgumentError(f"--seq-length {args.seq_length} exceeds --max-position-embeddings "
                            f"{args.max_position_embeddings}")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_warmup_iters and args.lr_warmup_iters >= args.lr_decay_iters:
        raise ArgumentError(f"--lr-warmup-iters {args.lr_warmup_iters} must be below --lr-decay-iters "
                            f"{args.lr_decay_iters} (default: --train-iters)")
    if args.min_lr > args.lr:
        raise ArgumentError(f"--min-lr {args.min_lr} is above --lr {args.lr}")
    if sum((bool(args.mock_data), bool(args.data_path), bool(args.train_data_path))) != 1:
        raise ArgumentError("give exactly one of --data-path, --train-data-path and --mock-data")
    if (args.valid_data_path or args.test_data_path) and not args.train_data_path:
        raise ArgumentError("--valid-data-path and --test-data-path go with --train-data-path (with --data-path, "
                            "--split carves the held-out sets out of it)")
    if not 0.0 <= args.condition_dropout_prob <= 1.0:
        raise ArgumentError(f"--condition-dropout-prob must be in [0, 1] (1 trains an unconditional model); got "
                            f"{args.condition_dropout_prob}")
    if args.mock_data and args.vocab_size is None:
        raise ArgumentError("--mock-data needs --vocab-size")
    for flag, data_path in named_data_paths(vars(args)):
        _check_data_path(data_path, flag)
        _check_datasets(args, flag, data_path)
    if args.arra and args.arra_targets == "precomputed":
        _check_one_encoder(named_data_paths(vars(args)))
    if args.finetune and not args.load:
        raise ArgumentError("--finetune needs --load CHECKPOINT")
    for name in ("log_interval", "eval_interval", "micro_batch_size", "train_iters"):
        if getattr(args, name) < 1:
            raise ArgumentError(f"{_flag(name)} must be >= 1")
    if args.tensorboard_dir:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise ArgumentError("--tensorboard-dir needs the tensorboard package (pip install tensorboard)")
    if args.arra and args.arra_targets == "online" and not args.arra_encoder:
        raise ArgumentError("--arra-targets online needs --arra-encoder")
    if args.arra and args.arra_targets == "online":
        try:
            parse_encoder_spec(args.arra_encoder)
        except ValueError as err:
            raise ArgumentError(f"--arra-encoder: {err}") from None
    arra_config(args).validate_for_model(num_layers=args.num_layers, hidden_size=args.hidden_size,
                                         tensor_model_parallel_size=tp)


DATA_PATH_FLAGS = ("data_path", "train_data_path", "valid_data_path", "test_data_path")


def named_data_paths(args: dict) -> List[Tuple[str, List[str]]]:
    """``(flag, value)`` of each data-path flag a run (or a checkpoint's saved arguments) gives."""
    return [(_flag(name), args[name]) for name in DATA_PATH_FLAGS if args.get(name)]


def training_data_path(args: dict) -> Optional[List[str]]:
    """The datasets a run trains on: ``--data-path`` or ``--train-data-path`` (None with mock data)."""
    return args.get("data_path") or args.get("train_data_path")


def data_prefixes(data_path: List[str]) -> List[str]:
    """The dataset prefixes of ``--data-path`` (with or without blend weights)."""
    if len(data_path) == 1:
        return list(data_path)
    if len(data_path) % 2:
        raise ArgumentError("--data-path with several datasets takes pairs: 'W1 PREFIX1 W2 PREFIX2 ...'")
    try:
        [float(w) for w in data_path[0::2]]
    except ValueError:
        raise ArgumentError("--data-path with several datasets takes pairs: 'W1 PREFIX1 W2 PREFIX2 ...'") from None
    return list(data_path[1::2])


def _check_data_path(data_path: List[str], flag: str = "--data-path") -> None:
    for prefix in data_prefixes(data_path):
        missing = [ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
        if missing:
            raise ArgumentError(f"{flag} {prefix}: no dataset there (missing {', '.join(prefix + e for e in missing)})")


def _check_one_encoder(named_paths: List[Tuple[str, List[str]]]) -> None:
    """Precomputed targets of every training and held-out dataset come from one encoder (its identity:
    weights hash, aggregation, preprocessing), or the losses would mix incomparable target spaces."""
    from arra_megatron.data.dataset import read_manifest

    seen: Optional[Tuple[str, dict]] = None
    for flag, data_path in named_paths:
        for prefix in data_prefixes(data_path):
            identity = read_manifest(prefix)["features"].get("encoder")
            if seen is None:
                seen = (f"{flag} {prefix}", identity)
            elif identity != seen[1]:
                raise ArgumentError(f"{flag} {prefix}: its precomputed ARRA targets come from another encoder than "
                                    f"those of {seen[0]} ({(identity or {}).get('name')} vs {(seen[1] or {}).get('name')}); "
                                    "recompute them with tools/precompute_features.py and one --encoder")


def _check_datasets(args: argparse.Namespace, flag: str, data_path: List[str]) -> None:
    """The datasets' manifests against the model: vocabulary, sequence length, target dimension."""
    from arra_megatron.data.dataset import read_manifest

    for prefix in data_prefixes(data_path):
        try:
            manifest = read_manifest(prefix)
        except FileNotFoundError as err:
            raise ArgumentError(f"{flag} {prefix}: {err}") from None
        profile = manifest["tokenizer_profile"]
        if args.vocab_size is not None and profile["vocab_size"] > args.vocab_size:
            raise ArgumentError(f"--vocab-size {args.vocab_size} is smaller than the vocabulary of {flag} "
                                f"{prefix} ({profile['vocab_size']}); raise it or drop --vocab-size")
        longest = manifest.get("max_seq_length")
        if longest is not None and longest > args.seq_length + 1:
            raise ArgumentError(f"{flag} {prefix} holds documents of up to {longest} tokens; --seq-length "
                                f"{args.seq_length} would cut them (use --seq-length {longest - 1})")
        if args.arra:
            features = manifest.get("features")
            if args.arra_targets == "precomputed" and not features:
                raise ArgumentError(f"{flag} {prefix} has no precomputed ARRA targets: add them with "
                                    "tools/precompute_features.py, use --arra-targets online, or --no-arra")
            if args.arra_targets == "precomputed":
                arra_config(args).validate_for_model(
                    num_layers=args.num_layers, hidden_size=args.hidden_size,
                    tensor_model_parallel_size=args.tensor_model_parallel_size,
                    encoder_dim=int(features["shape"][1]), layout_has_images=profile["tokens_per_image"] > 0)


def arra_config(args: argparse.Namespace) -> ARRAConfig:
    return ARRAConfig(
        enabled=args.arra,
        align_layer=args.arra_align_layer,
        weight=args.arra_weight,
        objective=args.arra_objective,
        target=args.arra_target,
        projector=args.arra_projector,
        target_dim=args.arra_target_dim,
        aggregation=args.arra_aggregation,
    )


def layer_backend(args: argparse.Namespace):
    """The layer spec ``--transformer-impl`` asks for (None: the default for this machine)."""
    from arra_megatron.runtime import cpu_mode

    if cpu_mode.is_enabled() or args.transformer_impl is None:
        return None
    return "te" if args.transformer_impl == "transformer_engine" else "local"


def transformer_config(args: argparse.Namespace):
    """Megatron-Core TransformerConfig (with this project's switches, ``ARRATransformerConfig``) from the
    parsed flags: the one place that maps model flags to the config (conversion builds through it too)."""
    from arra_megatron.models.norms import ARRATransformerConfig

    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    kwargs = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels,
        normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu,
        add_bias_linear=not args.disable_bias_linear,
        qk_layernorm=args.qk_layernorm,
        qk_layernorm_per_head=args.qk_layernorm_per_head,
        init_method_std=args.init_method_std,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        bf16=args.bf16,
        fp16=args.fp16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        fp8=args.fp8_format,
        fp8_recipe=args.fp8_recipe,
        fp8_margin=args.fp8_margin,
        fp8_amax_history_len=args.fp8_amax_history_len,
        fp8_amax_compute_algo=args.fp8_amax_compute_algo,
    )
    return ARRATransformerConfig(**{k: v for k, v in kwargs.items() if v is not None or k == "kv_channels"})
