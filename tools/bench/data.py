#!/usr/bin/env python
"""Data-path throughput, side by side in one run on the same generated data (CPU).

1. Encoder preprocessing of the same JPEGs (256-512 px photos-like images) for a
   CLIP-style spec (224 px, shortest-edge bicubic resize, centre crop, normalise):
   our DALI pipeline (``DaliImagePreprocessor``, CPU backend, one thread per core)
   vs the encoder library's own PIL + torchvision transform (``reference_preprocess``)
   in this process, and the same transform in a process pool of one worker per core
   (what a DataLoader with that many workers gets).
2. ARRA batch assembly, micro-batches in a shuffled order: our dataset
   (Megatron-Core IndexedDataset read + ``sample_from_document`` + the row of the
   memory-mapped float16 feature table + ``collate``) vs a one-file-per-sample loader
   (the layout of the authors' code and LlamaGen: one ``.npy`` of codes and one
   ``.npy`` feature per image, ``np.load`` per sample, then the same padding/collate).
   Also the read step alone (no padding/masks) for both. Files are freshly written,
   so both run from the page cache: a cold cache or network file system costs the
   per-file layout two opens per sample more.

    .venv/bin/python tools/bench/data.py [--num-images 256] [--num-samples 4096]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, List

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder
from PIL import Image

from arra_megatron.data.samples import collate, sample_from_document
from arra_megatron.encoders.preprocess import PreprocessSpec, reference_preprocess

CLIP_SPEC = PreprocessSpec("open_clip", 224, "shortest", "floor", "center", "bicubic",
                           (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
IMAGE_RANGE = (1000, 1000 + 16384)  # LlamaGen VQ-16 codebook after the text vocabulary
BOS, BOI, EOI, EOS, PAD = 1, 998, 999, 2, 0


def make_jpegs(n: int, seed: int = 0) -> List[bytes]:
    """Smooth colour fields with texture, 256-512 px each side, JPEG quality 90 (photo-like to a codec)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = (int(v) for v in rng.integers(256, 513, 2))
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
        pixels = np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
        pixels = np.clip(pixels + rng.integers(-12, 13, pixels.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def rates(fns: List[Callable[[], int]], repeats: int) -> List[float]:
    """Items per second of each ``fn`` (returning items done): best of ``repeats`` after a warm-up call.

    Runs are interleaved (A B A B ...) so that load from other processes on the machine
    hits every contender alike.
    """
    for fn in fns:
        fn()
    best = [0.0] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            start = time.perf_counter()
            items = fn()
            best[k] = max(best[k], items / (time.perf_counter() - start))
    return best


def _pil_chunk(images: List[bytes]) -> int:
    torch.set_num_threads(1)
    return len(reference_preprocess(CLIP_SPEC, images))


def bench_preprocessing(args) -> List[tuple]:
    from arra_megatron.data.dali_pipeline import DaliImagePreprocessor

    images = make_jpegs(args.num_images)
    dali = DaliImagePreprocessor(CLIP_SPEC, args.dali_batch_size, device="cpu", num_threads=args.threads)

    def run_dali() -> int:
        for start in range(0, len(images), args.dali_batch_size):
            out = dali(images[start:start + args.dali_batch_size])
            assert bool(out.valid.all())
        return len(images)

    def run_pil() -> int:
        return len(reference_preprocess(CLIP_SPEC, images))

    chunks = [images[i::args.threads] for i in range(args.threads)]
    with ProcessPoolExecutor(args.threads) as pool:
        def run_pil_pool() -> int:  # per-image results would be pickled back, as a DataLoader does
            return sum(pool.map(_pil_chunk, chunks))

        dali_rate, pil_rate, pil_pool = rates([run_dali, run_pil, run_pil_pool], args.repeats)
    sizes = f"{args.num_images} JPEGs 256-512 px -> 224 px"
    return [(f"DALI CPU, {args.threads} threads, batch {args.dali_batch_size}", dali_rate, "images/s", sizes),
            ("PIL + torchvision (open_clip transform), 1 process", pil_rate, "images/s", sizes),
            (f"PIL + torchvision, {args.threads} processes", pil_pool, "images/s", sizes),
            ("ratio DALI / PIL (1 process)", dali_rate / pil_rate, "x", "goal >= 1.5"),
            (f"ratio DALI / PIL ({args.threads} processes)", dali_rate / pil_pool, "x", "")]


def make_documents(n: int, tokens_per_image: int, seed: int = 1) -> List[np.ndarray]:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        caption = rng.integers(3, 998, rng.integers(8, 40))
        codes = rng.integers(*IMAGE_RANGE, tokens_per_image)
        docs.append(np.concatenate([[BOS], caption, [BOI], codes, [EOI, EOS]]).astype(np.int64))
    return docs


def bench_assembly(args, root: Path) -> List[tuple]:
    docs = make_documents(args.num_samples, args.tokens_per_image)
    features = np.random.default_rng(2).standard_normal((args.num_samples, args.feature_dim)).astype(np.float16)

    # Ours: one IndexedDataset + one memory-mapped [N, D] float16 table.
    prefix = str(root / "ours")
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(IMAGE_RANGE[1]))
    for doc in docs:
        builder.add_item(torch.from_numpy(doc))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    table = np.lib.format.open_memmap(f"{prefix}.features.npy", mode="w+", dtype=np.float16, shape=features.shape)
    table[:] = features
    table.flush()
    del table
    dataset = IndexedDataset(prefix, mmap=True)
    feature_table = np.load(f"{prefix}.features.npy", mmap_mode="r")

    # Per-file: codes/{i}.npy (int64, as LlamaGen's extract_codes saves them) + features/{i}.npy.
    (root / "codes").mkdir()
    (root / "features").mkdir()
    for i, doc in enumerate(docs):
        np.save(root / "codes" / f"{i}.npy", doc[None])
        np.save(root / "features" / f"{i}.npy", features[i])

    order = np.random.default_rng(3).permutation(args.num_samples)
    batches = [order[i:i + args.micro_batch_size] for i in range(0, len(order), args.micro_batch_size)]
    per_file_batches = batches[: max(1, len(batches) // 4)]  # slower: a quarter of the epoch is plenty

    def assemble(documents, rows) -> dict:
        samples = [sample_from_document(d, args.seq_length, IMAGE_RANGE, EOI, PAD) for d in documents]
        batch = collate(samples)
        batch["arra_targets"] = torch.from_numpy(np.asarray(rows, dtype=np.float32))
        return batch

    def read_ours(batch):
        return [dataset[int(i)] for i in batch], feature_table[np.sort(batch)][np.argsort(np.argsort(batch))]

    def read_files(batch):
        return ([np.load(root / "codes" / f"{i}.npy")[0] for i in batch],
                np.stack([np.load(root / "features" / f"{i}.npy") for i in batch]))

    def loop(read, full: bool, which) -> Callable[[], int]:
        def run() -> int:
            done = 0
            for batch in which:
                documents, rows = read(batch)
                if full:
                    assemble(documents, rows)
                done += len(batch)
            return done
        return run

    # Same samples from both layouts.
    a, b = read_ours(batches[0]), read_files(batches[0])
    assert all(np.array_equal(x, y) for x, y in zip(a[0], b[0])) and np.array_equal(a[1], b[1])
    ours_full, files_full, ours_read, files_read = rates(
        [loop(read_ours, True, batches), loop(read_files, True, per_file_batches),
         loop(read_ours, False, batches), loop(read_files, False, per_file_batches)], args.repeats)
    what = f"{args.num_samples} samples, seq {args.seq_length}, D={args.feature_dim}, mbs {args.micro_batch_size}"
    return [("ours: IndexedDataset + feature memmap, full assembly", ours_full, "samples/s", what),
            ("per-file .npy (codes + feature), full assembly", files_full, "samples/s", what),
            ("ratio ours / per-file (full assembly)", ours_full / files_full, "x", "goal >= 10"),
            ("ours: read only (documents + feature rows)", ours_read, "samples/s", ""),
            ("per-file: read only (2 x np.load)", files_read, "samples/s", ""),
            ("ratio ours / per-file (read only)", ours_read / files_read, "x", "")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--dali-batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="DALI threads / PIL processes")
    parser.add_argument("--num-samples", type=int, default=4096)
    parser.add_argument("--tokens-per-image", type=int, default=256)
    parser.add_argument("--seq-length", type=int, default=320)
    parser.add_argument("--feature-dim", type=int, default=768)
    parser.add_argument("--micro-batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (best is reported)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = bench_preprocessing(args)
    with tempfile.TemporaryDirectory(prefix="arra_bench_data_") as root:
        rows += bench_assembly(args, Path(root))
    print(f"\ndata path throughput ({os.cpu_count()} CPU cores, torch {torch.__version__})")
    width = max(len(r[0]) for r in rows)
    for name, value, unit, note in rows:
        number = f"{value:10.2f}" if unit == "x" else f"{value:10.1f}"
        print(f"  {name:<{width}}  {number} {unit:<9}  {note}")


if __name__ == "__main__":
    main()
