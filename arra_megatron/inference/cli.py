"""tools/generate.py: flags, checks, and the generation loop (model -> codes -> PNGs + samples.jsonl)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional, Sequence

import torch

from arra_megatron.inference.conditions import Condition, condition_tokens, dataset_profile, read_prompts
from arra_megatron.inference.sampling import SamplingConfig, prompt_tokens, sample_image_tokens

logger = logging.getLogger("generate")

PLAN_FILE = "generate.json"  # the request of an unfinished run, removed once samples.jsonl is written
SAMPLING_FLAGS = ("cfg_scale", "temperature", "top_k", "top_p", "kv_cache")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="generate.py", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Sample images from a trained ARRA model.\n\n"
                            "Under torchrun the world is TP x DP: --tensor-model-parallel-size processes hold one "
                            "model replica,\nand the replicas share the images (batch b goes to replica b mod DP). "
                            "An image depends only on its\ncondition and seed, not on the world size. An interrupted "
                            "run resumes when the same command is run\nagain (any world size): images already "
                            "written are skipped.")
    g = p.add_argument_group("model")
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--load", help="checkpoint directory of the training loop (--save of pretrain_arra.py, or "
                                       "one of its iter_*)")
    source.add_argument("--hf", help="transformers directory made by tools/convert_checkpoint.py export")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="with --load: processes per model replica (the world size must be a multiple)")
    g.add_argument("--device", default=None, help="with --hf: cpu or cuda (default: cuda when present)")
    g.add_argument("--data-path", help="dataset prefix whose tokenizer profile the model was trained on "
                                       "(default with --load: the checkpoint's first --data-path)")
    g.add_argument("--text-tokenizer", help="default: the path recorded in the dataset manifest")
    g.add_argument("--image-tokenizer", help="VQ model directory (default: the path recorded in the dataset manifest)")
    g.add_argument("--vqgan-checkpoint", help="Chameleon's vqgan.ckpt (Meta's release): decodes ChameleonVQVAE codes, "
                                              "which transformers cannot")

    g = p.add_argument_group("what to generate")
    cond = g.add_mutually_exclusive_group(required=True)
    cond.add_argument("--prompts", metavar="FILE", help="text-to-image: one prompt per line")
    cond.add_argument("--class-ids", type=int, nargs="+", metavar="ID", help="class-to-image: class ids")
    cond.add_argument("--unconditional", action="store_true",
                      help="the null condition that --arra-condition-dropout-prob trains (a model trained with "
                           "--arra-condition-dropout-prob 1 is an unconditional one); --num-samples images")
    g.add_argument("--num-samples", type=int, default=1, help="images per prompt or class")
    g.add_argument("--micro-batch-size", type=int, default=8, help="images sampled together (x2 with guidance)")

    g = p.add_argument_group("sampling")
    g.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1: off)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0: off")
    g.add_argument("--top-p", type=float, default=1.0, help="1.0: off")
    g.add_argument("--seed", type=int, default=0, help="image i (in output order) is drawn with seed + i")
    g.add_argument("--kv-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-kv-cache recomputes the whole sequence at every step (slow; a reference)")

    g = p.add_argument_group("output")
    g.add_argument("--out-dir", required=True, help="PNG files, grid.png and samples.jsonl (new, or an unfinished "
                                                    "run of the same command, which continues)")
    g.add_argument("--grid-nrow", type=int, default=8, help="images per row of grid.png")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                       cfg_scale=args.cfg_scale, use_cache=args.kv_cache)
    except ValueError as err:
        parser.error(str(err))
    for flag in ("num_samples", "micro_batch_size", "tensor_model_parallel_size", "grid_nrow"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.unconditional and args.cfg_scale != 1.0:
        parser.error("--unconditional samples the null condition: there is no condition for --cfg-scale to guide")
    if args.hf and not args.data_path:
        parser.error("--hf needs --data-path (the dataset whose tokenizer profile the model was trained on)")
    if os.path.exists(os.path.join(args.out_dir, "samples.jsonl")):
        parser.error(f"--out-dir {args.out_dir} already holds samples.jsonl; choose a new directory")
    if args.hf and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        parser.error("--hf samples in one process; for many processes use the training checkpoint (--load)")
    if args.prompts and not os.path.isfile(args.prompts):
        parser.error(f"--prompts {args.prompts}: no such file")
    return args


def _conditions(args) -> List[Condition]:
    if args.prompts:
        requested = [Condition(prompt=p) for p in read_prompts(args.prompts)]
    elif args.class_ids:
        requested = [Condition(class_id=c) for c in args.class_ids]
    else:
        requested = [Condition()]
    return [c for c in requested for _ in range(args.num_samples)]


def _profile_prefix(args, checkpoint_args: Optional[argparse.Namespace]) -> str:
    if args.data_path:
        return args.data_path
    from arra_megatron.data.checks import data_prefixes, training_data_path

    data_path = training_data_path(vars(checkpoint_args) if checkpoint_args is not None else {})
    if not data_path:
        raise ValueError(f"--load {args.load}: the run did not train on a dataset (--mock-data?); give --data-path")
    flag = "--data-path" if getattr(checkpoint_args, "data_path", None) else "--train-data-path"
    return data_prefixes(data_path, flag)[0]


def _decoder(args):
    """(sampling decoder, whether this process writes its replica's output, replica, replicas)."""
    if args.hf:
        from arra_megatron.inference.hf_decoder import HFDecoder, load_hf_model

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return HFDecoder(load_hf_model(args.hf, device), args.kv_cache), True, 0, 1
    from megatron.core import parallel_state

    from arra_megatron.inference.megatron_decoder import MegatronDecoder, build_inference_model
    from arra_megatron.runtime.distributed import initialize_model_parallel
    from arra_megatron.training.checkpoints import resolve

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % args.tensor_model_parallel_size:
        raise ValueError(f"world size {world} is not a multiple of --tensor-model-parallel-size "
                         f"{args.tensor_model_parallel_size}: launch TP x DP processes")
    initialize_model_parallel(args.tensor_model_parallel_size)
    model, _ = build_inference_model(resolve(args.load), args.tensor_model_parallel_size)
    return (MegatronDecoder(model, args.kv_cache), parallel_state.get_tensor_model_parallel_rank() == 0,
            parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size())


def _image_decoder(args, profile):
    """codes [b, n] -> pixels [b, 3, S, S]: the dataset's VQ model (Chameleon's with --vqgan-checkpoint)."""
    from arra_megatron.tokenization.image import ImageTokenizer
    from arra_megatron.tokenization.profile import content_sha256

    path = args.image_tokenizer or profile.vq_model.path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--image-tokenizer {path}: no such directory (the dataset's VQ model)")
    if content_sha256(path) != profile.vq_model.sha256:
        logger.warning("--image-tokenizer %s is not the VQ model the dataset was built with (content differs)", path)
    tokenizer = ImageTokenizer(path, profile.image_size)
    if tokenizer.tokens_per_image != profile.tokens_per_image:
        raise ValueError(f"--image-tokenizer {path} makes {tokenizer.tokens_per_image} codes per image, the "
                         f"dataset {profile.tokens_per_image}")
    if tokenizer.can_decode:
        return tokenizer.decode
    if tokenizer.kind != "ChameleonVQVAE" or not args.vqgan_checkpoint:
        raise NotImplementedError(f"--image-tokenizer {path}: transformers' {tokenizer.kind} has no decoder; "
                                  "give Chameleon's VQGAN weights with --vqgan-checkpoint")
    from arra_megatron.inference.chameleon_vqgan import ChameleonVQGANDecoder

    return ChameleonVQGANDecoder.from_checkpoint(args.vqgan_checkpoint, tokenizer.model.config).decode


def run(args: argparse.Namespace) -> dict:
    """Sample every requested image; returns a summary (on every rank; files from the writing ranks)."""
    from tqdm import tqdm

    from arra_megatron.fileio import check_json_plan
    from arra_megatron.inference.output import SampleWriter, merge, recorded
    from arra_megatron.runtime.faults import kill_after
    from arra_megatron.training.checkpoints import resolve, saved_args

    checkpoint_args = saved_args(resolve(args.load)) if args.load else None
    # Conditions are checked against the dataset's profile before any model is loaded.
    profile, max_seq_length = dataset_profile(_profile_prefix(args, checkpoint_args))
    conditions = _conditions(args)
    text = None
    if args.prompts:
        from arra_megatron.tokenization.text import TextTokenizer

        path = args.text_tokenizer or (profile.text_tokenizer.path if profile.text_tokenizer else None)
        if path is None or not os.path.exists(path):
            raise FileNotFoundError(f"--text-tokenizer {path}: not found (the dataset's text tokenizer)")
        text = TextTokenizer(path)
    prompts = [prompt_tokens(profile, c, max_seq_length) for c in condition_tokens(conditions, profile, text)]
    seeds = [args.seed + i for i in range(len(prompts))]
    mbs = args.micro_batch_size
    decoder, writes, replica, replicas = _decoder(args)
    first_rank = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    # The request of this run, so that a rerun continues only the same one (every rank checks, the
    # first writes it). The checkpoint is recorded resolved: a newer save in --load is another model.
    model = os.path.abspath(args.hf) if args.hf else resolve(args.load)
    check_json_plan(os.path.join(args.out_dir, PLAN_FILE), {
        "model": model, "conditions": [c.record() for c in conditions], "seeds": seeds,
        "sampling": {k: getattr(args, k) for k in SAMPLING_FLAGS}, "micro_batch_size": mbs,
        "tokenizers": {k: getattr(args, k) for k in ("data_path", "image_tokenizer", "text_tokenizer",
                                                     "vqgan_checkpoint")}},
        f"--out-dir {args.out_dir} holds an unfinished run of another request; choose a new directory or rerun "
        "the same command", write=first_rank)
    _barrier()
    done = recorded(args.out_dir)
    batches = [range(b, min(b + mbs, len(prompts))) for b in range(0, len(prompts), mbs)]
    mine = [b for i, b in enumerate(batches) if i % replicas == replica and not all(j in done for j in b)]
    if done and writes:
        logger.info("%s: %d of %d images written earlier; replica %d of %d samples %d batches", args.out_dir,
                    len(done), len(prompts), replica, replicas, len(mine))
    writer = SampleWriter(args.out_dir, _image_decoder(args, profile), replica, replicas) if writes else None
    bar = tqdm(total=sum(len(b) for b in mine) * profile.tokens_per_image, unit="token", desc="sampling",
               disable=not writes or replica > 0)
    try:
        for count, batch in enumerate(mine, 1):
            ids = list(batch)
            codes = sample_image_tokens(decoder, profile, [prompts[i] for i in ids], [seeds[i] for i in ids],
                                        args.sampling, progress=lambda _: bar.update(len(ids)))
            if writer is not None:
                writer.add(codes, [{**conditions[i].record(), "seed": seeds[i]} for i in ids], ids)
            kill_after("ARRA_GENERATE_FAIL_AFTER", count, replica)  # tests of the resume
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    _barrier()
    if first_rank:
        merge(args.out_dir, len(prompts), args.grid_nrow)
        os.remove(os.path.join(args.out_dir, PLAN_FILE))
        logger.info("wrote %d images (%d batches, %d replicas) to %s", len(prompts), len(batches), replicas,
                    args.out_dir)
    return {"images": len(prompts), "batches": len(batches), "out_dir": args.out_dir}


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    for name in ("megatron.core", "megatron"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from arra_megatron.inference.output import IncompleteSamples
    from arra_megatron.training.checkpoints import CheckpointError  # a --load without a usable checkpoint

    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError, CheckpointError,
            IncompleteSamples) as err:
        print(f"generate.py: error: {err}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_initialized():
            from arra_megatron.runtime.distributed import destroy_model_parallel

            destroy_model_parallel()
    return 0
