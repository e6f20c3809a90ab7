#!/usr/bin/env python
"""Training throughput on one GPU: tokens/s, TFLOP/s and MFU, bf16 vs FP8, ARRA on vs off.

Two model sizes (``--models``): ``llamagen-l`` (LlamaGen-L, 343M: hidden 1024, 24 layers,
16 heads, SwiGLU 2816) and ``1b`` (TinyLlama-1.1B shape: hidden 2048, 22 layers, 32 heads,
4 KV groups, SwiGLU 5632), both over 16,384 VQ codes plus condition ids and a 768-d
target (CLIP ViT-L/14). For each model and precision, the ARRA-on and ARRA-off models
are built from one seed and their steps interleaved (order flipped every pair), so the
on/off ratio is measured side by side; bf16 and FP8 are measured one after the other.

A step is forward + backward + Megatron's Adam step over one global batch. FLOPs are
counted as the trainer counts them (arra_megatron/training/metrics.py) and MFU is
against the GPU's dense bf16 peak (``--peak-tflops``; H100 SXM: 989).

    python tools/bench/gpu.py [--models llamagen-l 1b] [--steps 10] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch


from arra_megatron.config import ARRAConfig
from arra_megatron.runtime.capabilities import has_gpu, has_transformer_engine
from arra_megatron.runtime.distributed import initialize_model_parallel
from arra_megatron.testing import tiny
from arra_megatron.testing.steps import build_runner
from arra_megatron.training.metrics import training_flops_per_token

MODELS = {
    "llamagen-l": dict(num_layers=24, hidden_size=1024, num_attention_heads=16, num_query_groups=16,
                       ffn_hidden_size=2816, seq_length=288, micro_batch_size=16),
    "1b": dict(num_layers=22, hidden_size=2048, num_attention_heads=32, num_query_groups=4,
               ffn_hidden_size=5632, seq_length=384, micro_batch_size=8),
}
TARGET_DIM = 768


def measure(name: str, precision: str, args) -> dict:
    shape = dict(MODELS[name])
    seq, mbs = shape.pop("seq_length"), shape.pop("micro_batch_size")
    fp8 = dict(fp8="hybrid", fp8_recipe=args.fp8_recipe) if precision == "fp8" else {}
    runners = {}
    for arm in ("off", "on"):
        config = tiny.tiny_config(**shape, bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16,
                                  **fp8)
        arra = ARRAConfig(target_dim=TARGET_DIM) if arm == "on" else ARRAConfig(enabled=False)
        # The layer spec is the trainer's default: Transformer Engine when installed, else local.
        runners[arm] = build_runner(config, arra, seq, mbs, mbs * args.micro_batches, seed=1234)
    times = {"on": [], "off": []}
    for i in range(args.warmup + args.steps):
        for arm in (("on", "off") if i % 2 == 0 else ("off", "on")):
            torch.cuda.synchronize()
            start = time.perf_counter()
            runners[arm]()
            torch.cuda.synchronize()
            if i >= args.warmup:
                times[arm].append(time.perf_counter() - start)
    result = {"model": name, "precision": precision, "seq_length": seq, "micro_batch_size": mbs,
              "micro_batches": args.micro_batches,
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30}
    for arm, runner in runners.items():
        config = runner.bundle.config
        flops = training_flops_per_token(config, runner.vocab_size, seq, TARGET_DIM if arm == "on" else 0)
        median = statistics.median(times[arm])
        tokens = runner.tokens_per_step / median
        result[arm] = {"step_s": median, "tokens_per_s": tokens, "tflops": tokens * flops / 1e12,
                       "mfu": tokens * flops / 1e12 / args.peak_tflops,
                       "params_m": sum(p.numel() for c in runner.bundle.chunks for p in c.parameters()) / 1e6}
    result["arra_ratio_medians"] = result["on"]["step_s"] / result["off"]["step_s"]
    result["arra_ratio_paired"] = statistics.median(a / b for a, b in zip(times["on"], times["off"]))
    del runners
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["llamagen-l", "1b"])
    parser.add_argument("--precisions", nargs="+", choices=["bf16", "fp8"], default=["bf16", "fp8"])
    parser.add_argument("--fp8-recipe", choices=["delayed", "tensorwise", "mxfp8"], default="delayed")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per arm")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per arm first")
    parser.add_argument("--micro-batches", type=int, default=2, help="micro-batches per global batch")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100 SXM)")
    parser.add_argument("--json-out", help="write every figure here as JSON")
    args = parser.parse_args()
    if not has_gpu():
        parser.error("this benchmark needs a CUDA GPU")
    if "fp8" in args.precisions and not has_transformer_engine():
        parser.error("--precisions fp8 needs Transformer Engine")
    initialize_model_parallel(1, 1)
    results = []
    for name in args.models:
        for precision in args.precisions:
            results.append(measure(name, precision, args))
            r = results[-1]
            print(f"{name:>10} {precision:>4}: " + "  ".join(
                f"ARRA {arm} {r[arm]['tokens_per_s']:,.0f} tok/s {r[arm]['tflops']:.0f} TFLOP/s "
                f"MFU {r[arm]['mfu']:.1%}" for arm in ("off", "on"))
                + f"  on/off {r['arra_ratio_paired']:.3f}", flush=True)
    print(f"\ndevice: {torch.cuda.get_device_name()}; {args.steps} timed steps per arm, "
          f"global batch = {args.micro_batches} micro-batches")
    print(f"{'model':>10} {'prec':>5} {'params':>7} {'tok/s off':>10} {'tok/s on':>10} {'TFLOP/s on':>10} "
          f"{'MFU on':>7} {'on/off':>7} {'peak GiB':>8}")
    for r in results:
        print(f"{r['model']:>10} {r['precision']:>5} {r['on']['params_m']:>6.0f}M {r['off']['tokens_per_s']:>10,.0f} "
              f"{r['on']['tokens_per_s']:>10,.0f} {r['on']['tflops']:>10.1f} {r['on']['mfu']:>7.1%} "
              f"{r['arra_ratio_paired']:>7.3f} {r['peak_memory_gib']:>8.1f}")
    for name in args.models:
        by = {r["precision"]: r for r in results if r["model"] == name}
        if {"bf16", "fp8"} <= set(by):
            for arm in ("off", "on"):
                print(f"FP8 speed-up {name} ARRA {arm}: "
                      f"{by['fp8'][arm]['tokens_per_s'] / by['bf16'][arm]['tokens_per_s']:.3f}x")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
