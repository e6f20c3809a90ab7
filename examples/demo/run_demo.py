#!/usr/bin/env python
"""`make demo`: build a small ARRA dataset from real images and train on 2 CPU processes.

1. Real images that ship inside scikit-learn (its 1,797 handwritten digits, 8x8,
   upscaled to 32x32) are written as an ImageNet-style class-folder tree.
2. A tiny random VQ tokenizer (transformers JanusVQVAE, 64 codes per image) and a
   tiny random CLIP target encoder (open_clip local-dir) are created: this machine
   cannot download pretrained weights, so targets and codes come from random
   networks. The pipeline is the real one; the numbers are a smoke test, not a result.
3. tools/build_indexed_dataset.py turns the folder into a class-to-image dataset with
   precomputed ARRA targets.
4. examples/pretrain_arra.py (Megatron-LM's training loop) trains with torchrun on 2
   gloo processes (TP2 by default, or PP2), stops half way after a checkpoint
   (--exit-interval), resumes from it (--load), and finishes.
5. The falling lm and gva losses are printed from the run's --log-json file, with the
   validation and test losses Megatron-LM's evaluation reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(cmd: list, env: dict | None = None) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, env={**os.environ, **(env or {})})


def write_digits(folder: Path, size: int = 32) -> int:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        image = Image.fromarray((pixels * (255.0 / 16.0)).astype("uint8"), mode="L")
        target = folder / f"digit_{label}"
        target.mkdir(parents=True, exist_ok=True)
        image.resize((size, size), Image.Resampling.BICUBIC).save(target / f"{i:04d}.png")
    return len(digits.images)


def summarize(log_path: Path, window: int = 20) -> dict:
    """Mean of the first and the last ``window`` training records (megatron_loop.JsonLog's keys)."""
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    train = [r for r in rows if "split" not in r]
    first, last = train[:window], train[-window:]
    out = {}
    for key in ("lm_loss", "gva_loss", "gva_cos"):
        out[key] = (sum(r[key] for r in first) / len(first), sum(r[key] for r in last) / len(last))
    return out


def evaluations(log_path: Path) -> list:
    """The evaluation records (``"split": "valid"`` or ``"test"``), in the order they were written."""
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    return [r for r in rows if "split" in r]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "demo_out"))
    parser.add_argument("--layout", choices=["tp2", "pp2"], default="tp2")
    parser.add_argument("--train-iters", type=int, default=300)
    args = parser.parse_args()
    started = time.perf_counter()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)

    from arra_megatron.runtime.launch import free_port
    from arra_megatron.tiny import make_janus_vq, make_tiny_clip

    count = write_digits(out / "digits")
    print(f"wrote {count} scikit-learn digit images to {out / 'digits'}")
    vq = make_janus_vq(out / "models" / "vq")
    clip = make_tiny_clip(out / "models" / "clip")

    prefix = out / "data" / "digits"
    _run([sys.executable, "tools/build_indexed_dataset.py", "--input", out / "digits", "--input-kind", "folder",
          "--output-prefix", prefix, "--image-tokenizer", vq, "--image-size", 32, "--max-seq-length", 81,
          "--encoder", f"open_clip:local-dir:{clip}", "--workers", 2])

    layout = ["--tensor-model-parallel-size", "2"] if args.layout == "tp2" else ["--pipeline-model-parallel-size", "2"]
    half = args.train_iters // 2
    log = out / "train.jsonl"
    common = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "0",
              "--master-addr", "127.0.0.1", "--master-port", free_port(),
              "examples/pretrain_arra.py", "--config", "examples/configs/demo.yaml", "--data-path", prefix,
              "--train-iters", args.train_iters, "--save", out / "ckpt",
              "--save-interval", half, "--log-json", log, *layout]
    env = {"OMP_NUM_THREADS": "1"}
    _run(common + ["--exit-interval", half], env)
    print(f"--- stopped at iteration {half} after its checkpoint; resuming from {out / 'ckpt'}", flush=True)
    _run(common + ["--load", out / "ckpt"], env)

    summary = summarize(log)
    print("\nARRA demo summary (mean of the first and last 20 iterations)")
    for key, (a, b) in summary.items():
        print(f"  {key:9s} {a:8.4f} -> {b:8.4f}")
    for record in evaluations(log):
        print(f"  {record['split']:5s} at iteration {record['iteration']:4d}: "
              + ", ".join(f"{k} {record[k]:.4f}" for k in ("lm_loss", "gva_loss", "gva_cos") if k in record))
    print(f"checkpoints: {sorted(p.name for p in (out / 'ckpt').glob('iter_*'))}")
    print(f"wall time: {time.perf_counter() - started:.0f} s")
    falling = summary["lm_loss"][1] < summary["lm_loss"][0] and summary["gva_loss"][1] < summary["gva_loss"][0]
    if not falling:
        print("error: the losses did not fall", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
