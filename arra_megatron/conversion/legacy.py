"""Checkpoints of arra_megatron's own trainer -> Megatron-LM checkpoints ``megatron_loop`` resumes from.

Before training moved onto Megatron-LM's loop (``training/megatron_loop.py``), the project's
trainer wrote ``ROOT/iter_NNNNNNN/`` with ``arra_complete.json``: a Megatron-Core dist checkpoint
holding the model (``model``, or ``model0``, ... per virtual stage, projector under
``arra_projector.``), the optimizer's sharded state (saved with the metadata
``{"distrib_optim_sharding_type": "fully_reshardable"}``), the scheduler's state dict, its own
RNG object, and the common entries ``iteration``, ``consumed_samples``, ``layout`` and ``args``
(a plain dict of that trainer's flags).

The conversion builds what Megatron-LM's loop would build for that run, in this process (a
world of one, TP1 / PP1, CPU): the old flags become ``megatron_loop`` flags (renamed ones
renamed, derived ones dropped, mock data of the run's vocabulary size standing in for the
datasets), Megatron-LM's ``setup_model_and_optimizer`` builds model, optimizer and scheduler,
the old model and optimizer tensors and the scheduler state are read into them, and
``megatron.training.checkpointing.save_checkpoint`` writes the iteration with
``consumed_train_samples`` in its saved arguments, where Megatron-LM keeps it. Dist checkpoints
reshard on load, so the result resumes at any TP / PP / DP. The old RNG states are not carried
(the old per-rank objects have no Megatron-LM counterpart): the checkpoint holds this process's
freshly seeded states, which a resume at TP1 / PP1 restores and any other layout ignores.

A resume gives the run's flags plus those Megatron-LM requires or derives differently from the old
trainer (``resume_flags``: ``--max-position-embeddings``, ``--ffn-hidden-size`` with ``--swiglu``,
renamed ones); the log names them. A distributed optimizer's state is read only where Transformer
Engine or Apex is installed (``check_optimizer_readable``).

    python -m arra_megatron.conversion.legacy --load runs/old/ckpt --save runs/old/ckpt-megatron
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import io
import logging
import os
import re
import shutil
import sys
import warnings
from typing import List, Optional

from arra_megatron.conversion.common import ConversionError

logger = logging.getLogger(__name__)

LEGACY_MARKER = "arra_complete.json"  # the old trainer's "every rank saved" file in an iteration directory
TRACKER_FILE = "latest_checkpointed_iteration.txt"
#: The optimizer metadata the old trainer saved with (training/checkpointing.py ``_optimizer_metadata``).
LEGACY_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}

#: Old flags whose names changed in the new loop.
RENAMED = {"z_loss_weight": "arra_z_loss_weight", "condition_dropout_prob": "arra_condition_dropout_prob",
           "loss_on_text": "arra_loss_on_text"}
#: Old keys that are no flag of the run (values the old parser derived), or that say where the run
#: read and wrote and how it was launched, or settings of the layers' implementation on that machine
#: (FP8, Transformer Engine): none changes what the checkpoint holds.
NOT_CARRIED = frozenset({
    "config", "load", "save", "log_json", "tensorboard_dir", "exit_interval", "save_interval", "finetune",
    "no_load_optim", "no_load_rng", "data_parallel_size", "num_microbatches", "virtual_pipeline_model_parallel_size",
    "num_layers_per_virtual_pipeline_stage", "tensor_model_parallel_size", "pipeline_model_parallel_size",
    "sequence_parallel", "overlap_grad_reduce", "distributed_timeout_minutes", "transformer_impl", "fp8_format",
    "fp8_recipe", "fp8_margin", "fp8_amax_history_len", "fp8_amax_compute_algo",
})
#: The data a run read: the conversion builds on mock data of the same vocabulary (the datasets need
#: not be on this machine) and records the run's own values in the saved arguments afterwards.
DATA_KEYS = ("data_path", "train_data_path", "valid_data_path", "test_data_path", "split", "mock_data",
             "arra_targets", "arra_encoder")


@dataclasses.dataclass
class LegacyCheckpoint:
    """One iteration directory written by the old trainer."""

    path: str
    iteration: int
    consumed_samples: int
    layout: dict       # {"tp", "pp", "dp", "vpp"} it was saved with
    args: dict         # the old trainer's flags


# ----------------------------------------------------------------------------- the old checkpoint
def find_legacy(load: str) -> LegacyCheckpoint:
    """The old checkpoint ``--load`` names: an iteration directory, or a root whose newest complete
    iteration directory the old trainer would have resumed from."""
    from megatron.core import dist_checkpointing

    if not os.path.isdir(load):
        raise ConversionError(f"--load {load}: no such directory")
    if os.path.isfile(os.path.join(load, LEGACY_MARKER)):
        path = load
    else:
        complete, unfinished = [], []
        for candidate in sorted(glob.glob(os.path.join(load, "iter_*"))):
            match = re.fullmatch(r"iter_(\d+)", os.path.basename(candidate))
            if match and os.path.isfile(os.path.join(candidate, LEGACY_MARKER)):
                complete.append((int(match.group(1)), candidate))
            elif match:
                unfinished.append(candidate)
        for candidate in unfinished if complete else []:  # as the old trainer: only complete ones count
            logger.warning("ignoring %s: no %s (that save did not finish)", candidate, LEGACY_MARKER)
        if not complete:
            if os.path.isfile(os.path.join(load, TRACKER_FILE)) or os.path.isfile(os.path.join(load, "metadata.json")):
                raise ConversionError(f"--load {load}: not a checkpoint of arra_megatron's own trainer (no "
                                      f"{LEGACY_MARKER}); a Megatron-LM checkpoint needs no conversion")
            raise ConversionError(f"--load {load}: no checkpoint of arra_megatron's own trainer there (no iter_* "
                                  f"directory with {LEGACY_MARKER})")
        path = max(complete)[1]
    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except Exception as err:  # noqa: BLE001 - name the directory whatever the reader raised
        raise ConversionError(f"--load {path}: not a readable dist checkpoint ({type(err).__name__}: {err})") from err
    missing = [key for key in ("iteration", "consumed_samples", "args") if key not in common]
    if missing or not isinstance(common["args"], dict):
        raise ConversionError(f"--load {path}: not a checkpoint of arra_megatron's own trainer (its common state "
                              f"lacks {missing or ['the args dictionary']})")
    return LegacyCheckpoint(path, int(common["iteration"]), int(common["consumed_samples"]),
                            dict(common.get("layout") or {}), dict(common["args"]))


def legacy_vocab_size(old_args: dict, vocab_size: Optional[int] = None) -> int:
    """The run's unpadded vocabulary: ``vocab_size`` when given, else the old ``--vocab-size``, else
    the datasets' manifests when they are on this machine."""
    if vocab_size is not None:
        return vocab_size
    if old_args.get("vocab_size"):
        return int(old_args["vocab_size"])
    paths = [(flag, old_args.get(key)) for flag, key in (("--data-path", "data_path"),
                                                          ("--train-data-path", "train_data_path"))]
    named = [(flag, path) for flag, path in paths if path]
    if named:
        from arra_megatron.data.checks import data_prefixes
        from arra_megatron.data.dataset import read_layout

        flag, path = named[0]
        prefixes = data_prefixes(path, flag)
        if all(os.path.isfile(prefix + ".json") for prefix in prefixes):
            return read_layout(prefixes)[0].vocab_size
        where = f"its datasets ({flag} {' '.join(path)}) are not on this machine"
    else:
        where = "it records no dataset"
    raise ConversionError(f"the checkpoint does not record its vocabulary size and {where}: give --vocab-size "
                          "(the tokenizer's vocabulary the run trained with)")


def padded_rows(path: str) -> int:
    """Rows of the old embedding: the vocabulary padded for the TP size it trained with."""
    from megatron.core import dist_checkpointing

    return int(dist_checkpointing.load_tensors_metadata(path)["embedding.word_embeddings.weight"].global_shape[0])


# ----------------------------------------------------------------------------- flags
def loop_flags(old: LegacyCheckpoint, vocab_size: int, parser: argparse.ArgumentParser) -> List[str]:
    """``megatron_loop`` flags that build the old run's model, optimizer and schedule at TP1 / PP1 on
    mock data of ``vocab_size`` ids. Unknown old keys are dropped with a warning."""
    argv: List[str] = []
    for key, value in sorted(old.args.items()):
        if key in NOT_CARRIED or key in DATA_KEYS or key in ("vocab_size", "make_vocab_size_divisible_by"):
            continue
        rendered = _render_flag(parser, RENAMED.get(key, key), value)
        if rendered is None:
            logger.warning("old setting %s=%r has no flag in Megatron-LM's loop: dropped", key, value)
            continue
        argv += rendered
    argv += ["--mock-data", "--vocab-size", str(vocab_size), "--make-vocab-size-divisible-by", str(vocab_multiple(old)),
             "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1"]
    if old.args.get("use_distributed_optimizer"):
        argv.append("--dist-ckpt-optim-fully-reshardable")  # any DP may resume it (dp_reshardable: the same DP)
    return argv


def vocab_multiple(old: LegacyCheckpoint) -> int:
    """The old rows were padded to a multiple of --make-vocab-size-divisible-by x its TP size; at TP1
    the same rows need that product as the multiple (a resume at that TP pads to them again)."""
    return int(old.args.get("make_vocab_size_divisible_by") or 128) * int(old.layout.get("tp") or 1)


def check_vocab_rows(old: LegacyCheckpoint, vocab_size: int, given: bool) -> int:
    """The embedding rows the old checkpoint holds, which ``vocab_size`` must pad to."""
    from arra_megatron.models.gpt import pad_vocab_size

    rows, padded = padded_rows(old.path), pad_vocab_size(vocab_size, 1, vocab_multiple(old))
    if rows != padded:
        source = "--vocab-size" if given else "the vocabulary size found,"
        raise ConversionError(f"{source} {vocab_size} pads to {padded} rows, but {old.path} holds {rows}: give "
                              "the vocabulary the run trained with (--vocab-size)")
    return rows


def _render_flag(parser: argparse.ArgumentParser, dest: str, value) -> Optional[List[str]]:
    """The command-line form of one old setting; None when the new parser has no such flag."""
    option = "--" + dest.replace("_", "-")
    action = parser._option_string_actions.get(option)
    if action is None:
        return None
    if action.nargs == 0:  # a switch: the old value says whether its flag was given
        if isinstance(action, argparse.BooleanOptionalAction):
            return [option if value else "--no-" + option[2:]]
        return [option] if value else []
    if value is None:
        return []
    values = value if isinstance(value, (list, tuple)) else [value]
    if action.type is int:  # the old parser read some of these as floats (10.0)
        values = [int(v) for v in values]
    return [option] + [str(v) for v in values]


def resume_flags(old_args: dict) -> List[str]:
    """The old run's settings a resume must spell out in Megatron-LM's loop: those it requires
    (``--max-position-embeddings``, which the old trainer derived from ``--seq-length``) or derives
    differently (``--ffn-hidden-size``: 4 x hidden there, about 8/3 x hidden with ``--swiglu`` here),
    and the renamed ones the run set."""
    flags = []
    hidden, ffn = old_args.get("hidden_size"), old_args.get("ffn_hidden_size")
    if hidden and ffn and ffn != (int((4 * hidden * 2 / 3) / 64) * 64 if old_args.get("swiglu") else 4 * hidden):
        flags += ["--ffn-hidden-size", str(ffn)]
    if old_args.get("max_position_embeddings"):
        flags += ["--max-position-embeddings", str(old_args["max_position_embeddings"])]
    for key, new in sorted(RENAMED.items()):
        value = old_args.get(key)
        if value:
            flags += ["--" + new.replace("_", "-")] + ([] if value is True else [str(value)])
    return flags


def check_optimizer_readable(old: LegacyCheckpoint) -> None:
    """A distributed optimizer's state loads through Megatron-Core 0.19's DistributedOptimizer, whose
    pure-PyTorch path (no Apex, no Transformer Engine: CPU mode) cannot load a checkpoint into a fresh
    optimizer: ``state_dict()`` asserts on the still-empty Adam state (distrib_optimizer.py, "assert
    len(steps) == 1"), and ``_set_main_param_and_optimizer_states`` then fails on Adam's ``step``
    tensor. The old trainer and Megatron-LM's loop fail the same way when they resume such a run here."""
    if not old.args.get("use_distributed_optimizer"):
        return
    from megatron.core.optimizer import distrib_optimizer

    if not distrib_optimizer.HAVE_APEX_OR_TE:
        from arra_megatron.runtime.capabilities import megatron_core_version

        raise ConversionError(f"{old.path} was trained with --use-distributed-optimizer; megatron-core "
                              f"{megatron_core_version()} cannot read that optimizer state without Transformer Engine "
                              "or Apex (its pure-PyTorch DistributedOptimizer fails loading into a fresh optimizer, "
                              "and megatron_loop cannot resume such a checkpoint here either): convert it where "
                              "Transformer Engine is installed")


def check_target(save: str) -> None:
    """``--save`` must not hold a checkpoint (complete or not): nothing is overwritten."""
    if os.path.exists(save) and not os.path.isdir(save):
        raise ConversionError(f"--save {save} is a file; give a directory")
    held = [name for name in sorted(os.listdir(save)) if name == TRACKER_FILE or name == "release"
            or re.fullmatch(r"iter_\d+", name)] if os.path.isdir(save) else []
    if held:
        raise ConversionError(f"--save {save} already holds a checkpoint ({', '.join(held[:3])}); give a new or empty "
                              "directory (nothing was written)")
    parent = os.path.dirname(os.path.abspath(save))
    if not os.path.isdir(parent):
        raise ConversionError(f"--save {save}: parent directory {parent} does not exist")


# ----------------------------------------------------------------------------- conversion
def convert_legacy(load: str, save: str, vocab_size: Optional[int] = None, verbose: bool = False) -> str:
    """Convert the old trainer's checkpoint at ``load`` into a Megatron-LM checkpoint under ``save``;
    returns the iteration directory written.

    Initialises torch.distributed (a world of one) and Megatron-LM's global state in this process:
    call it once per process. ``verbose`` lets Megatron-LM's own output through (shown anyway when
    the conversion fails).
    """
    check_target(save)
    old = find_legacy(load)
    vocab = legacy_vocab_size(old.args, vocab_size)
    rows = check_vocab_rows(old, vocab, given=vocab_size is not None)
    check_optimizer_readable(old)
    logger.info("%s: iteration %d, %d samples consumed, saved at TP %s / PP %s / DP %s", old.path, old.iteration,
                old.consumed_samples, old.layout.get("tp"), old.layout.get("pp"), old.layout.get("dp"))
    captured = io.StringIO()
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(captured)
    try:
        with quiet:
            model, optimizer, scheduler, args = _build(old, vocab)
        logger.info("built the model, optimizer and scheduler of that run at TP 1 / PP 1 (vocabulary %d in %d rows)",
                    vocab, rows)
        with quiet:
            _load_legacy_state(old, model, optimizer, scheduler)
        logger.info("read the model%s, the optimizer state and the scheduler state",
                    " (with the ARRA projector)" if old.args.get("arra", True) else "")
        logger.info("RNG states are not carried over: the checkpoint holds freshly seeded ones (seed %d), which a "
                    "resume at TP 1 / PP 1 restores and any other layout ignores", args.seed)
        with quiet:
            path = _save(old, model, optimizer, scheduler, args, save)
    except Exception:
        if not verbose and captured.getvalue():
            sys.stderr.write(captured.getvalue()[-20000:])
        raise
    finally:
        import torch

        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    logger.info("wrote %s (iteration %d, consumed_train_samples %d)", path, old.iteration, old.consumed_samples)
    logger.info("resume with the run's flags, %s and --load %s", " ".join(resume_flags(old.args)) or "as they were",
                save)
    return path


def _build(old: LegacyCheckpoint, vocab_size: int):
    """Megatron-LM's initialisation and ``setup_model_and_optimizer`` for the old run, as
    ``megatron_loop.main`` prepares ``pretrain``."""
    from megatron.core.enums import ModelType
    from megatron.training import get_args
    from megatron.training import training as megatron_training_loop

    from arra_megatron.runtime import cpu_mode
    from arra_megatron.training import megatron_loop

    os.environ.setdefault("ARRA_CPU_MODE", "1")  # a file conversion: no GPU needed, gloo for the world of one
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise ConversionError("the conversion runs in one process; start it with python, not torchrun")
    cpu_mode.maybe_enable_cpu_mode()  # before the parser: CPU mode's defaults (gloo, local layers)
    argv = loop_flags(old, vocab_size, megatron_loop.build_parser())
    logger.info("building the run in Megatron-LM's loop with: %s", " ".join(argv))
    try:
        megatron_loop.setup(argv)
    except SystemExit as err:
        raise ConversionError(f"Megatron-LM's loop refuses the old run's settings: {err}") from None
    megatron_training_loop.initialize_megatron()
    model, optimizer, scheduler = megatron_training_loop.setup_model_and_optimizer(
        ModelType.encoder_or_decoder, model_provider_func=megatron_loop.model_provider)
    return model, optimizer, scheduler, get_args()


def _load_legacy_state(old: LegacyCheckpoint, model, optimizer, scheduler) -> None:
    """The old model and optimizer tensors (as the old trainer requested them) and scheduler state."""
    from megatron.core import dist_checkpointing

    from arra_megatron.training import checkpoints

    checkpoints.load_model(model, old.path)  # every tensor of the model and projector, strictly
    model_sd = checkpoints.model_sharded_state_dict(model)
    request = {"optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                         metadata=dict(LEGACY_OPTIMIZER_METADATA))}
    loaded = dist_checkpointing.load(request, old.path)
    optimizer.load_state_dict(loaded["optimizer"])
    # The old schedule as it was (its values, not those the flags would compute, which agree anyway).
    scheduler.use_checkpoint_opt_param_scheduler, scheduler.override_opt_param_scheduler = True, False
    scheduler.load_state_dict(loaded["opt_param_scheduler"])


def _save(old: LegacyCheckpoint, model, optimizer, scheduler, args, save: str) -> str:
    """Megatron-LM's own save, with the iteration and consumed samples of the old run."""
    from megatron.training.checkpointing import save_checkpoint

    args.save = os.path.abspath(save)
    args.iteration = old.iteration
    args.consumed_train_samples = old.consumed_samples
    args.consumed_valid_samples = 0
    for key in DATA_KEYS:  # the saved arguments record the run's own data, not the stand-in mock data
        if key in old.args:
            setattr(args, key, old.args[key])
    path = os.path.join(args.save, f"iter_{old.iteration:07d}")
    created = not os.path.isdir(args.save)
    os.makedirs(args.save, exist_ok=True)
    try:
        save_checkpoint(old.iteration, model, optimizer, scheduler, 0)
    except BaseException:  # leave no half-written checkpoint behind (check_target would refuse a retry)
        shutil.rmtree(args.save if created else path, ignore_errors=True)
        raise
    return path


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert_checkpoint.py legacy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="the old trainer's checkpoint root (or one iter_* directory)")
    parser.add_argument("--save", required=True, help="new Megatron-LM checkpoint root (a new or empty directory)")
    parser.add_argument("--vocab-size", type=int, help="the run's vocabulary size, when the checkpoint does not "
                        "record it and its datasets are not on this machine")
    parser.add_argument("--verbose", action="store_true", help="show Megatron-LM's own output and warnings")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Exit status: 0 converted, 2 bad flags or inputs."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # Megatron-LM's logging and import warnings (missing TE / Apex, deprecations)
        logging.getLogger("megatron").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        convert_legacy(args.load, args.save, vocab_size=args.vocab_size, verbose=args.verbose)
    except ConversionError as error:
        logger.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":  # dist checkpointing may spawn processes: the guard is required
    sys.exit(main())
