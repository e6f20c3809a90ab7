#!/usr/bin/env python
"""ARRA's cost through the real entry point: Megatron-LM's loop with ARRA on vs off, interleaved.

Each round launches ``python -m arra_megatron.training.megatron_loop`` twice, ARRA on and off
in turn (the order flips every round, so drift on a shared machine hits both alike), with
the same model, data and seed; the per-iteration times come from Megatron's own log line
(``elapsed time per iteration``), the first ``--warmup`` iterations of each run left out.
Beside the times: aten ops and host-device synchronisations (scalar reads, ``nonzero``) per
step of the same forward step and schedule, counted with the profiler.

    .venv/bin/python tools/bench/loop_overhead.py [--rounds 3] [--iters 8] [--warmup 2]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([0-9.]+)")


def model_flags(args) -> list:
    return (f"--num-layers {args.num_layers} --hidden-size {args.hidden_size} --num-attention-heads 8 "
            f"--seq-length {args.seq_length} --max-position-embeddings {args.seq_length} "
            f"--micro-batch-size {args.micro_batch_size} --global-batch-size {args.global_batch_size} "
            f"--lr 1e-4 --vocab-size {args.vocab_size} --position-embedding-type rope --normalization RMSNorm "
            f"--swiglu --disable-bias-linear --untie-embeddings-and-output-weights --mock-data --seed 1234 "
            f"--hidden-dropout 0 --attention-dropout 0 --log-interval 1 --eval-interval 100000 --eval-iters 0 "
            f"--num-workers 0 --arra-align-layer 2 --arra-target-dim {args.arra_target_dim}").split()


def run_loop(args, arra: bool) -> list:
    # Without a GPU the loop runs in CPU mode, whose defaults are gloo, local layers and no fusions.
    cmd = [sys.executable, "-m", "arra_megatron.training.megatron_loop", *model_flags(args),
           "--train-iters", str(args.iters), "--arra" if arra else "--no-arra"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    times = {int(m.group(1)): float(m.group(2)) for m in ITERATION.finditer(proc.stdout + proc.stderr)}
    return [times[i] / 1000 for i in sorted(times) if i > args.warmup]


def count_ops(args) -> dict:
    """aten ops and sync ops per step, ARRA on and off (one process, the loop's forward step)."""
    from torch.profiler import ProfilerActivity, profile

    from arra_megatron import tiny
    from arra_megatron.config import ARRAConfig
    from arra_megatron.runtime.distributed import initialize_model_parallel
    from arra_megatron.training.step_runner import build_runner

    initialize_model_parallel(1, 1)
    out = {}
    for arm, arra in (("off", ARRAConfig(enabled=False)),
                      ("on", ARRAConfig(align_layer=2, target_dim=args.arra_target_dim))):
        config = tiny.tiny_config(num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=8,
                                  num_query_groups=8)
        runner = build_runner(config, arra, args.seq_length, args.micro_batch_size, args.global_batch_size,
                              num_image_tokens=args.seq_length - 16)
        runner(optimizer_step=False)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            runner(optimizer_step=False)
        names = collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::"))
        out[arm] = {"aten ops": sum(names.values()),
                    "syncs": sum(names[n] for n in ("aten::_local_scalar_dense", "aten::nonzero"))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="runs per arm (interleaved)")
    parser.add_argument("--iters", type=int, default=8, help="iterations per run")
    parser.add_argument("--warmup", type=int, default=2, help="iterations of each run left out")
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=288)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--global-batch-size", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=16384)
    parser.add_argument("--arra-target-dim", type=int, default=512)
    args = parser.parse_args()

    times = {"on": [], "off": []}
    for r in range(args.rounds):
        for arm in (("on", "off") if r % 2 == 0 else ("off", "on")):
            times[arm] += run_loop(args, arm == "on")
            print(f"round {r + 1}/{args.rounds}: ARRA {arm} done", flush=True)
    counts = count_ops(args)
    print(f"hidden {args.hidden_size}, {args.num_layers} layers, sequence {args.seq_length}, micro-batch "
          f"{args.micro_batch_size}, global batch {args.global_batch_size}, D {args.arra_target_dim}; "
          f"{args.rounds} runs x {args.iters - args.warmup} timed iterations per arm")
    for arm in ("off", "on"):
        t = times[arm]
        print(f"ARRA {arm:>3}: median {statistics.median(t):.3f} s/iteration, mean {statistics.mean(t):.3f}, "
              f"min {min(t):.3f}; per step {counts[arm]['aten ops']} aten ops, {counts[arm]['syncs']} syncs")
    print(f"ratio on/off: {statistics.median(times['on']) / statistics.median(times['off']):.3f} (medians), "
          f"{min(times['on']) / min(times['off']):.3f} (minima)")


if __name__ == "__main__":
    main()
