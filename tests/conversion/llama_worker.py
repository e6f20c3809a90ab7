"""Worker side of the conversion tests: an imported checkpoint in the trainer's own model."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from arra_megatron.models.gpt import pad_vocab_size
from arra_megatron.training.arguments import arra_config, parse_args, transformer_config
from arra_megatron.training.checkpointing import load_checkpoint
from arra_megatron.training.forward_step import ARRAForwardStep, read_metrics
from arra_megatron.training.model import build_model
from arra_megatron.runtime.distributed import initialize_model_parallel

SEQ = 32


def trainer_args(model_flags: list, tp: int, pp: int):
    """The trainer's parsed flags: the import record's model flags plus a minimal run."""
    argv = model_flags + [
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--seq-length", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "1",
        "--lr", "1e-4", "--mock-data", "--no-arra", "--hidden-dropout", "0", "--attention-dropout", "0",
    ]
    return parse_args(argv, world_size=tp * pp)


def megatron_outputs(ckpt: str, model_flags: list, tp: int, pp: int, samples: dict, image_token_range) -> dict:
    """Load ``ckpt`` (``--finetune``) into the trainer's model at TP x PP; return the trainer's lm loss
    over ``samples`` and the full logits (gathered over TP, from the last stage)."""
    args = trainer_args(model_flags, tp, pp)
    initialize_model_parallel(tp, pp, seed=args.seed)
    config = transformer_config(args)
    vocab = pad_vocab_size(args.vocab_size, tp, args.make_vocab_size_divisible_by)
    bundle = build_model(config, arra_config(args), vocab, args.seq_length, seed=args.seed,
                         position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
                         share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights)
    load_checkpoint(ckpt, bundle.chunks, None, None, finetune=True)
    for chunk in bundle.chunks:
        chunk.eval()

    captured = []
    gpt = bundle.chunks[-1].module
    if gpt.post_process:
        gpt.output_layer.register_forward_hook(lambda mod, inp, out: captured.append(out[0].detach().clone()))

    mbs = [{k: v[i:i + 2] for k, v in samples.items()} for i in range(0, samples["tokens"].size(0), 2)]
    step = ARRAForwardStep(arra_config(args), image_token_range, None, num_microbatches=len(mbs))
    with torch.no_grad():
        losses = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter(mbs), model=bundle.chunks, num_microbatches=len(mbs),
            seq_length=SEQ, micro_batch_size=2, forward_only=True,
        )
    metrics = read_metrics(step.end_step(losses))
    out = {"metrics": metrics, "padded_vocab": vocab}
    if captured:  # [s, b, v/tp] per micro-batch -> [n, s, v]
        group = parallel_state.get_tensor_model_parallel_group()
        full = []
        for part in captured:
            parts = [torch.empty_like(part) for _ in range(group.size())]
            torch.distributed.all_gather(parts, part.contiguous(), group=group)
            full.append(torch.cat(parts, dim=-1).transpose(0, 1))
        if parallel_state.get_tensor_model_parallel_rank() == 0:
            out["logits"] = torch.cat(full)
    return out


def save_in_layout(ckpt: str, model_flags: list, layout: list, world_size: int, save: str) -> None:
    """The trainer (ARRA on, so a projector is saved too) loads ``ckpt`` with ``--finetune`` in
    ``layout`` (flags, which may also change the optimizer), trains one step, by default at
    learning rate 0 (the weights stay bit-identical; the distributed optimizer only writes its
    state after a step), and saves its checkpoint: model, projector, optimizer, scheduler, RNG."""
    from arra_megatron.training.arguments import parse_args
    from arra_megatron.training.trainer import Trainer

    args = parse_args(model_flags + [
        "--seq-length", str(SEQ), "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "1",
        "--lr", "0", "--mock-data", "--arra-target-dim", "16", "--num-workers", "0", "--eval-interval", "1000",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--load", ckpt, "--finetune", "--save", save,
    ] + layout, world_size=world_size)  # layout flags last: they win
    Trainer(args).train()
