#!/usr/bin/env python
"""ARRA's cost per training step: interleaved steps with ARRA on and off, one process.

Two models of the same shape (hidden 512, 8 layers, sequence 320, micro-batch 4,
targets given) are built from the same seed; steps alternate between them (the
order flips every pair so drift hits both alike) and the script prints the time
of each and their ratio. A step is forward + backward over the global batch and a
Megatron optimizer (Adam) step. Runs on CPU (CPU mode) or on one GPU.

    .venv/bin/python tools/bench/arra_overhead.py [--steps 8] [--warmup 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from arra_megatron import tiny
from arra_megatron.config import ARRAConfig
from arra_megatron.runtime.distributed import initialize_model_parallel
from arra_megatron.training.step_runner import build_runner


def make_runner(args, arra: ARRAConfig, seed: int):
    config = tiny.tiny_config(num_layers=args.num_layers, hidden_size=args.hidden_size,
                              num_attention_heads=8, num_query_groups=8)
    return build_runner(config, arra, args.seq_length, args.micro_batch_size, args.global_batch, seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per arm")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per arm first")
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=320)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--arra-target-dim", type=int, default=512)
    args = parser.parse_args()

    initialize_model_parallel(1, 1)
    runners = {
        "off": make_runner(args, ARRAConfig(enabled=False), seed=1234),
        "on": make_runner(args, ARRAConfig(align_layer=1, target_dim=args.arra_target_dim), seed=1234),
    }
    times = {"on": [], "off": []}
    last = {}
    for i in range(args.warmup + args.steps):
        order = ("on", "off") if i % 2 == 0 else ("off", "on")
        for arm in order:
            start = time.perf_counter()
            last[arm] = runners[arm]()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[arm].append(time.perf_counter() - start)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device}; hidden {args.hidden_size}, {args.num_layers} layers, sequence {args.seq_length}, "
          f"micro-batch {args.micro_batch_size}, {args.steps} timed steps per arm")
    for arm in ("off", "on"):
        t = times[arm]
        print(f"ARRA {arm:>3}: median {statistics.median(t):.3f} s/step, mean {statistics.mean(t):.3f}, "
              f"min {min(t):.3f}   last losses {', '.join(f'{k} {v:.4f}' for k, v in last[arm].items())}")
    ratio = statistics.median(times["on"]) / statistics.median(times["off"])
    paired = statistics.median(a / b for a, b in zip(times["on"], times["off"]))
    print(f"ratio on/off: {ratio:.3f} (medians), {paired:.3f} (median of paired steps)")


if __name__ == "__main__":
    main()
