#!/usr/bin/env python
"""The tools at scale, measured side by side: dataset building and sampling, one process vs several.

1. Build: ``--images`` photo-like JPEGs (256-512 px, tools/bench/data.py) in class folders,
   tokenized at 256 px by a VQ of LlamaGen's VQ-16 shape (transformers' JanusVQVAE: 16x
   down-sampling, 16,384 codes of 8 dims, base 128 channels; random weights, so the speed of
   the real tokenizer, not its codes), optionally with ``--encoder`` targets, through
   tools/build_indexed_dataset.py as one process and under torchrun with ``--processes``
   processes (one thread each). Prints images/s in total and per process, and checks that
   both builds give the same bytes.
2. Sampling (with ``--load CKPT``): tools/generate.py at DP1 and under torchrun at DP
   ``--processes`` on the same request: images/s in total and per replica, same files.
3. The arithmetic for LAION-COCO (600 M images): process-hours of the VQ pass at the
   measured per-process build rate (give ``--rate`` to use a GPU's measured rate instead).

Times are wall clock of the whole command, start-up (imports, model loading) included, as a
user sees them; ``--images`` sets how much it is amortised.

    .venv/bin/python tools/bench/scale.py --images 192 --processes 2
    .venv/bin/python tools/bench/scale.py --images 0 --load study/runs/cond-arra-s0/ckpt \\
        --samples 200 --sample-flags="--class-ids 0 1 2 3 4 5 6 7 8 9 --cfg-scale 1.5"
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools" / "bench"))

LAION_COCO_IMAGES = 600_000_000


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "ARRA_CPU_MODE": "1", "PYTHONPATH": str(ROOT)}


def timed(cmd: List[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{cmd[:4]} ... failed (exit {proc.returncode}); see {log}")
    return seconds


def torchrun(nproc: int, script: str, args: List[str]) -> List[str]:
    from arra_megatron.runtime.launch import free_port

    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--max-restarts=0",
            "--master-addr=127.0.0.1", f"--master-port={free_port()}", script, *args]


def vq16(path: Path) -> None:
    from transformers import JanusVQVAE, JanusVQVAEConfig

    config = JanusVQVAEConfig(embed_dim=8, num_embeddings=16384, latent_channels=256, base_channels=128,
                              channel_multiplier=[1, 1, 2, 2, 4], num_res_blocks=2, num_patches=16,
                              architectures=["JanusVQVAE"])
    JanusVQVAE(config).eval().save_pretrained(path)


def bench_build(args, root: Path) -> float:
    from data import make_jpegs  # tools/bench/data.py

    images = root / "images"
    for i, data in enumerate(make_jpegs(args.images)):
        folder = images / f"class_{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:06d}.jpg").write_bytes(data)
    vq16(root / "vq16")
    flags = ["--input", str(images), "--input-kind", "folder", "--image-tokenizer", str(root / "vq16"),
             "--image-size", "256", "--max-seq-length", "261", "--num-parts", str(4 * args.processes),
             "--batch-size", "8", "--device", "cpu"]
    if args.encoder:
        flags += ["--encoder", args.encoder, "--encoder-aggregation", args.encoder_aggregation]
    tool = str(ROOT / "tools" / "build_indexed_dataset.py")
    one = timed([sys.executable, tool, *flags, "--output-prefix", str(root / "one" / "data")], root / "one.log")
    many = timed(torchrun(args.processes, tool, [*flags, "--output-prefix", str(root / "many" / "data")]),
                 root / "many.log")
    same = all((root / "one" / f"data{s}").read_bytes() == (root / "many" / f"data{s}").read_bytes()
               for s in (".bin", ".idx", ".images.npy"))
    rate = args.images / one
    print(f"\n## Build: {args.images} JPEGs (256-512 px) -> 256 codes each (VQ-16 shape){' + ' + args.encoder if args.encoder else ''}")
    print("| processes | wall s | images/s | images/s per process |\n|---|---|---|---|")
    print(f"| 1 | {one:.1f} | {rate:.2f} | {rate:.2f} |")
    print(f"| {args.processes} | {many:.1f} | {args.images / many:.2f} | {args.images / many / args.processes:.2f} |")
    print(f"scaling {one / many:.2f}x on {args.processes} processes; same bytes: {same}")
    return rate


def bench_sampling(args, root: Path) -> None:
    flags = ["--load", args.load, "--num-samples", str(args.samples), "--micro-batch-size", str(args.micro_batch_size),
             "--seed", "0", *shlex.split(args.sample_flags)]
    if args.data_path:
        flags += ["--data-path", args.data_path]
    tool = str(ROOT / "tools" / "generate.py")
    one = timed([sys.executable, tool, *flags, "--out-dir", str(root / "dp1")], root / "dp1.log")
    many = timed(torchrun(args.processes, tool, [*flags, "--out-dir", str(root / "dpN")]), root / "dpN.log")
    same = (root / "dp1" / "samples.jsonl").read_bytes() == (root / "dpN" / "samples.jsonl").read_bytes()
    total = sum(1 for _ in open(root / "dp1" / "samples.jsonl", encoding="utf-8"))
    print(f"\n## Sampling: {total} images from {args.load} ({args.sample_flags or 'defaults'})")
    print("| replicas | wall s | images/s | images/s per replica |\n|---|---|---|---|")
    print(f"| 1 | {one:.1f} | {total / one:.2f} | {total / one:.2f} |")
    print(f"| {args.processes} | {many:.1f} | {total / many:.2f} | {total / many / args.processes:.2f} |")
    print(f"scaling {one / many:.2f}x on {args.processes} replicas; same samples.jsonl: {same}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=192, help="JPEGs to build (0: skip the build)")
    p.add_argument("--processes", type=int, default=2, help="processes of the parallel runs")
    p.add_argument("--encoder", help="also compute targets with this --encoder spec")
    p.add_argument("--encoder-aggregation", default="cls")
    p.add_argument("--load", help="a checkpoint of pretrain_arra.py to sample from (omitted: no sampling bench)")
    p.add_argument("--data-path", help="its dataset prefix, when the checkpoint does not name one")
    p.add_argument("--samples", type=int, default=256, help="--num-samples per condition")
    p.add_argument("--micro-batch-size", type=int, default=64)
    p.add_argument("--sample-flags", default="--unconditional", help="generate.py's condition and sampling flags (give them with =, e.g. --sample-flags=--unconditional)")
    p.add_argument("--rate", type=float, help="images/s per process for the LAION-COCO arithmetic "
                                              "(default: the build's measured rate)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="arra_bench_scale_") as tmp:
        root = Path(tmp)
        rate = bench_build(args, root / "build") if args.images else None
        if args.load:
            (root / "sample").mkdir()
            bench_sampling(args, root / "sample")
    rate = args.rate or rate
    if rate:
        hours = LAION_COCO_IMAGES / rate / 3600
        print(f"\n## LAION-COCO ({LAION_COCO_IMAGES / 1e6:.0f} M images) at {rate:.2f} images/s per process: "
              f"{hours:,.0f} process-hours for the VQ pass; on 64 processes {hours / 64:,.0f} h")


if __name__ == "__main__":
    main()
