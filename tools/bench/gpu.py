#!/usr/bin/env python
"""Training throughput on one GPU: tokens/s, TFLOP/s and MFU, bf16 vs FP8, ARRA on vs off.

Two model sizes (``--models``): ``llamagen-l`` (LlamaGen-L, 343M: hidden 1024, 24 layers,
16 heads, SwiGLU 2816) and ``1b`` (TinyLlama-1.1B shape: hidden 2048, 22 layers, 32 heads,
4 KV groups, SwiGLU 5632), both over 16,384 VQ codes plus condition ids and a 768-d
target (CLIP ViT-L/14). For each model and precision, the ARRA-on and ARRA-off models
are built from one seed and their steps interleaved (order flipped every pair), so the
on/off ratio is measured side by side; bf16 and FP8 are measured one after the other.

Each model is described by the flags of the training loop (``examples/pretrain_arra.py``, with
``--mock-data``), parsed and validated by it (``megatron_loop.parse_args``) and mapped to the
model's config by it (``megatron_loop.transformer_config``): the bench measures the config a
run with these flags trains. A step is forward + backward + Megatron's Adam step over one
global batch. FLOPs are Megatron-LM's own count, the one its log line reports
(``megatron.training.training.num_floating_point_operations``: the GPT's causal FLOPs, the
same for ARRA on and off, so the on/off ratio of TFLOP/s is that of the step times), and MFU
is against the GPU's dense bf16 peak (``--peak-tflops``; H100 SXM: 989).

    python tools/bench/gpu.py [--models llamagen-l 1b] [--steps 10] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import statistics
import time
from typing import List

import torch

from arra_megatron.runtime.capabilities import has_gpu, has_transformer_engine
from arra_megatron.runtime.distributed import initialize_model_parallel
from arra_megatron.training.step_runner import IMAGE_RANGE, build_runner

MODELS = {
    "llamagen-l": dict(num_layers=24, hidden_size=1024, num_attention_heads=16, num_query_groups=16,
                       ffn_hidden_size=2816, seq_length=288, micro_batch_size=16),
    "1b": dict(num_layers=22, hidden_size=2048, num_attention_heads=32, num_query_groups=4,
               ffn_hidden_size=5632, seq_length=384, micro_batch_size=8),
}
TARGET_DIM = 768


def loop_flags(name: str, precision: str, arra: bool, args) -> List[str]:
    """pretrain_arra.py's flags for one model, precision and ARRA arm (Llama-style, dropout off)."""
    shape = MODELS[name]
    flags = ["--mock-data", "--vocab-size", IMAGE_RANGE[1], "--num-layers", shape["num_layers"],
             "--hidden-size", shape["hidden_size"], "--num-attention-heads", shape["num_attention_heads"],
             "--group-query-attention", "--num-query-groups", shape["num_query_groups"],
             "--ffn-hidden-size", shape["ffn_hidden_size"], "--seq-length", shape["seq_length"],
             "--max-position-embeddings", shape["seq_length"], "--micro-batch-size", shape["micro_batch_size"],
             "--global-batch-size", shape["micro_batch_size"] * args.micro_batches, "--train-iters", 1,
             "--lr", 1e-4, "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
             "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights", "--hidden-dropout", 0,
             "--attention-dropout", 0, "--bf16"]
    flags += ["--arra-target-dim", TARGET_DIM] if arra else ["--no-arra"]
    if precision == "fp8":
        flags += ["--fp8-format", "hybrid", "--fp8-recipe", args.fp8_recipe]
    return [str(f) for f in flags]


def measure(name: str, precision: str, args) -> dict:
    from megatron.training.training import num_floating_point_operations

    from arra_megatron.training.megatron_loop import arra_config, layer_backend, parse_args, transformer_config

    runners, loop_args = {}, {}
    for arm in ("off", "on"):
        with contextlib.redirect_stdout(io.StringIO()):  # Megatron-LM prints every argument
            loop_args[arm], _ = parse_args(loop_flags(name, precision, arm == "on", args))
        margs = loop_args[arm]
        # The layer spec is the loop's: Transformer Engine when installed, else local.
        runners[arm] = build_runner(transformer_config(margs), arra_config(margs), margs.seq_length,
                                    margs.micro_batch_size, margs.global_batch_size, seed=1234,
                                    backend=layer_backend(margs))
        margs.padded_vocab_size = runners[arm].vocab_size  # what Megatron-LM's tokenizer setup would set
    seq, mbs = loop_args["on"].seq_length, loop_args["on"].micro_batch_size
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
        margs = loop_args[arm]
        flops = num_floating_point_operations(margs, margs.global_batch_size)  # one step, Megatron-LM's count
        median = statistics.median(times[arm])
        tokens = runner.tokens_per_step / median
        tflops = flops / median / 1e12
        result[arm] = {"step_s": median, "tokens_per_s": tokens, "tflops": tflops, "mfu": tflops / args.peak_tflops,
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
