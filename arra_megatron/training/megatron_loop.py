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
from typing import Optional, Tuple

import torch

from arra_megatron.config import ARRAConfig

#: Settings the loop needs whatever the command line says.
ARGS_DEFAULTS = {"tokenizer_type": "NullTokenizer"}


# ----------------------------------------------------------------------------- arguments
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``extra_args_provider``: the ARRA flags (one per ARRAConfig field) and the project's own."""
    _escape_stray_percent(parser)
    g = parser.add_argument_group("ARRA")
    g.add_argument("--arra", action=argparse.BooleanOptionalAction, default=True,
                   help="the alignment loss (--no-arra: plain next-token training)")
    g.add_argument("--arra-align-layer", type=int, default=1, help="k: 1-based global layer aligned")
    g.add_argument("--arra-weight", type=float, default=1.0, help="lambda, the weight of L_GVA")
    g.add_argument("--arra-objective", choices=["cos", "mse"], default="cos")
    g.add_argument("--arra-target", choices=["hybnext", "rep"], default="hybnext")
    g.add_argument("--arra-projector", choices=["mlp", "pool"], default="mlp")
    g.add_argument("--arra-target-dim", type=int, help="D, the dimension of f_GF (default: the dataset's "
                   "feature table; 512 with --mock-data)")
    g.add_argument("--arra-aggregation", choices=["cls", "avgpool", "concat"], default="cls")
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


def _escape_stray_percent(parser: argparse.ArgumentParser) -> None:
    """megatron-core 0.19.2 writes a bare "%" in a help text (--moe-paged-stash-buffer-size-factor-cuda,
    "e.g. 1.10 = 10%)"), which makes argparse's --help raise; escape the ones that are not
    argparse's own ``%(name)s``."""
    for action in parser._actions:
        if action.help and "%" in action.help:
            action.help = re.sub(r"%(\(\w+\)[sdrfg]|%)?", lambda m: m.group(0) if m.group(1) else "%%",
                                 action.help)


def arra_config(args: argparse.Namespace) -> ARRAConfig:
    return ARRAConfig(enabled=args.arra, align_layer=args.arra_align_layer, weight=args.arra_weight,
                      objective=args.arra_objective, target=args.arra_target, projector=args.arra_projector,
                      target_dim=args.arra_target_dim, aggregation=args.arra_aggregation)


@dataclasses.dataclass
class DataLayout:
    """What the model and the loss need to know about the data before it is built."""

    vocab_size: int                        # ids the tokenizer produces (logits above are masked)
    image_token_range: Tuple[int, int]
    target_dim: Optional[int] = None       # D of the feature table


def data_layout(args: argparse.Namespace) -> DataLayout:
    """From the dataset manifests (or the mock's rules); read on every rank before any work."""
    if args.mock_data:
        if not args.vocab_size:
            raise SystemExit("--mock-data needs --vocab-size")
        from arra_megatron.data.mock import mock_image_token_range

        return DataLayout(args.vocab_size, mock_image_token_range(args.vocab_size))
    from arra_megatron.data.dataset import read_layout
    from arra_megatron.training.arguments import data_prefixes

    paths = [path for path in (args.data_path, args.train_data_path, args.valid_data_path, args.test_data_path)
             if path]
    if not paths:
        raise SystemExit("give --data-path (or --train-data-path ...) or --mock-data")
    profile, target_dim = read_layout([prefix for path in paths for prefix in data_prefixes(path)])
    return DataLayout(profile.vocab_size, tuple(profile.image_token_range), target_dim)


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
    if args.arra_target_dim is None:
        args.arra_target_dim = layout.target_dim or 512
    if getattr(args, "context_parallel_size", 1) > 1 and args.arra:
        raise SystemExit("ARRA does not support --context-parallel-size > 1 (L_GVA would need a CP reduction)")
    arra_config(args).validate_for_model(num_layers=args.num_layers, hidden_size=args.hidden_size,
                                         tensor_model_parallel_size=args.tensor_model_parallel_size,
                                         encoder_dim=layout.target_dim if args.arra else None)
    return layout


# ----------------------------------------------------------------------------- run state
class _Run:
    """Per-process state shared by the providers (pretrain calls them without context)."""

    layout: Optional[DataLayout] = None
    config = None
    tap = None
    step = None
    json_log: Optional["JsonLog"] = None


def _transformer_config(args):
    from megatron.training.argument_utils import core_transformer_config_from_args

    from arra_megatron.models.norms import ARRATransformerConfig
    from arra_megatron.runtime import cpu_mode

    if _Run.config is None:  # one config for every chunk: the schedules read model[0]'s
        _Run.config = core_transformer_config_from_args(args, config_class=ARRATransformerConfig)
        cpu_mode.configure(_Run.config)
    return _Run.config


def padded_vocab_size(args) -> int:
    from arra_megatron.models.gpt import pad_vocab_size

    return pad_vocab_size(_Run.layout.vocab_size, args.tensor_model_parallel_size, args.make_vocab_size_divisible_by)


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None,
                   config=None, pg_collection=None):
    """One GPT chunk; the chunk that holds layer k carries the ARRA projector."""
    from megatron.training import get_args

    from arra_megatron.alignment.tap import ARRATap, find_layer
    from arra_megatron.models.gpt import build_gpt_chunk
    from arra_megatron.models.specs import default_backend

    args = get_args()
    config = _transformer_config(args)
    backend = "local" if args.transformer_impl == "local" and default_backend() == "te" else default_backend()
    gpt = build_gpt_chunk(config, padded_vocab_size(args), args.max_position_embeddings, backend=backend,
                          vp_stage=vp_stage, pre_process=pre_process, post_process=post_process,
                          position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
                          share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                          real_vocab_size=_Run.layout.vocab_size, pg_collection=pg_collection)
    arra = arra_config(args)
    if not arra.enabled:
        return gpt
    if _Run.tap is None:  # on every rank (the forward step asks it whether it holds layer k)
        _Run.tap = ARRATap(arra, config, seed=args.seed, te_linear=backend == "te")
    if find_layer([gpt], arra.align_layer) is None:
        return gpt
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
        return tuple(MockSplit(mock, split, max(n, 1)) for split, n in enumerate(sizes))
    from arra_megatron.data.dataset import build_arra_datasets

    per_split = [args.train_data_path, args.valid_data_path, args.test_data_path] if args.train_data_path else None
    datasets, _ = build_arra_datasets(
        args.data_path, args.split, args.seq_length, args.seed, sizes, per_split=per_split,
        condition_dropout_prob=args.arra_condition_dropout_prob, loss_on_text=args.arra_loss_on_text,
        with_features=args.arra)
    return datasets


datasets_provider.is_distributed = True  # every rank builds what its chunks read (no TP broadcast)


# ----------------------------------------------------------------------------- forward step
def forward_step(data_iterator, model):
    if _Run.step is None:
        from megatron.training import get_args

        from arra_megatron.training.forward_step import ARRAForwardStep

        args = get_args()
        _Run.step = ARRAForwardStep(arra_config(args), _Run.layout.image_token_range, _Run.tap,
                                    z_loss_weight=args.arra_z_loss_weight,
                                    per_token_loss=args.calculate_per_token_loss)
    return _Run.step(data_iterator, model)


# ----------------------------------------------------------------------------- metrics
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
def main(argv=None) -> None:
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    from arra_megatron.runtime import cpu_mode, megatron_training

    cpu_mode.maybe_enable_cpu_mode()
    megatron_training.install()
    _single_process_env()
    layout = early_layout(argv)
    defaults = {**ARGS_DEFAULTS, **({"vocab_size": layout.vocab_size} if layout.vocab_size else {})}
    args = parse_and_validate_args(extra_args_provider=add_arguments, args_defaults=defaults)
    _Run.layout = prepare_args(args, layout)
    if args.log_json and int(os.environ["RANK"]) == int(os.environ["WORLD_SIZE"]) - 1:  # the last stage
        _Run.json_log = JsonLog(args.log_json, args.log_interval)
    install_metric_hooks()
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
