"""Worker side of the conversion tests: a checkpoint in the model of Megatron-LM's loop
(``training/megatron_loop.py``), and training through that loop."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

SEQ = 32
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def loop_args(model_flags: list, tp: int, pp: int):
    """The loop's parsed arguments: an import's model flags plus a minimal run at TP x PP."""
    from arra_megatron.conversion.common import parse_megatron_args

    return parse_megatron_args(model_flags + [
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--seq-length", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "1",
        "--lr", "1e-4", "--mock-data", "--no-arra", "--hidden-dropout", "0", "--attention-dropout", "0",
    ], tp * pp)


def megatron_outputs(ckpt: str, model_flags: list, tp: int, pp: int, samples: dict, image_token_range) -> dict:
    """Load checkpoint ``ckpt`` into the loop's model at TP x PP (``transformer_config`` / ``build_gpt``,
    ``checkpoints.load_model``); return the lm loss over ``samples`` and the full logits
    (gathered over TP, from the last stage)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from arra_megatron.models.gpt import pad_vocab_size
    from arra_megatron.runtime.distributed import initialize_model_parallel
    from arra_megatron.training import checkpoints, megatron_loop
    from arra_megatron.training.forward_step import ARRAForwardStep, read_metrics

    args = loop_args(model_flags, tp, pp)
    initialize_model_parallel(tp, pp, seed=args.seed)
    vocab = pad_vocab_size(args.vocab_size, tp, args.make_vocab_size_divisible_by)
    gpt = megatron_loop.build_gpt(args, megatron_loop.transformer_config(args), vocab, args.vocab_size,
                                  pre_process=parallel_state.is_pipeline_first_stage(),
                                  post_process=parallel_state.is_pipeline_last_stage())
    checkpoints.load_model([gpt], checkpoints.resolve(ckpt), projector=False)
    gpt.eval()

    captured = []
    if gpt.post_process:
        gpt.output_layer.register_forward_hook(lambda mod, inp, out: captured.append(out[0].detach().clone()))

    mbs = [{k: v[i:i + 2] for k, v in samples.items()} for i in range(0, samples["tokens"].size(0), 2)]
    step = ARRAForwardStep(megatron_loop.arra_config(args), image_token_range, None, num_microbatches=len(mbs))
    with torch.no_grad():
        losses = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter(mbs), model=[gpt], num_microbatches=len(mbs),
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


def loop(nproc: int, *flags: str) -> subprocess.CompletedProcess:
    """Megatron-LM's loop (``python -m arra_megatron.training.megatron_loop``) under torchrun on
    ``nproc`` CPU processes."""
    from arra_megatron.runtime.launch import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "arra_megatron.training.megatron_loop", *flags]
    env = {**os.environ, "ARRA_CPU_MODE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def save_in_layout(ckpt: str, model_flags: list, layout: list, nproc: int, save: str) -> None:
    """The loop (ARRA on, so a projector is saved too) starts from ``ckpt`` with ``--finetune`` in
    ``layout`` (flags, which may also change the optimizer), trains one step, by default at
    learning rate 0 (the weights stay bit-identical; the distributed optimizer only writes its
    state after a step), and saves its checkpoint: model, projector, optimizer, scheduler, RNG."""
    loop(nproc, *model_flags,
         "--seq-length", str(SEQ), "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "1",
         "--lr", "0", "--min-lr", "0", "--mock-data", "--arra-target-dim", "16", "--num-workers", "0",
         "--eval-iters", "0", "--hidden-dropout", "0", "--attention-dropout", "0",
         "--load", ckpt, "--finetune", "--save", save, "--save-interval", "1", *layout)  # layout last: it wins
