#!/usr/bin/env python
"""Add precomputed ARRA targets (PREFIX.features.npy) to a dataset built by tools/build_indexed_dataset.py.

Reads each sample's image through the dataset's image reference table
(PREFIX.images.npy + PREFIX.images.sources.json), preprocesses it as training does
online (DALI when installed) and encodes it with the frozen target encoder. The table
is float16 [N, D], row i for document i; a sample whose image cannot be decoded gets
a NaN row (no alignment target). The manifest's "features" field records the encoder.

Examples:
    python tools/precompute_features.py --data-prefix data/laion \\
        --encoder open_clip:local-dir:/models/BiomedCLIP --encoder-aggregation cls

    # replace the table with MedSAM avgpool targets, on a GPU
    python tools/precompute_features.py --data-prefix data/mimic --encoder sam:/models/medsam-vit-base \\
        --encoder-aggregation avgpool --device cuda --overwrite

    # your own encoder: a function in a module on PYTHONPATH (arra_megatron/encoders/python_encoder.py)
    PYTHONPATH=examples/study python tools/precompute_features.py --data-prefix data/laion \\
        --encoder python:arra_study_nets:efficientnet_lite0 --encoder-aggregation avgpool --overwrite

    # every GPU of 4 nodes (run on each node; or as a SLURM array job, one GPU per task)
    torchrun --nnodes 4 --node-rank $NODE_RANK --nproc-per-node 8 --master-addr $MASTER_ADDR \\
        tools/precompute_features.py --data-prefix /data/laion_coco_t2i \\
        --encoder open_clip:local-dir:/models/clip_vit_l14 --device cuda

Rows are computed in chunks (PREFIX.features.npy.parts/chunk-NNNNN.npy) that the processes
claim in turn; the one that computes the last chunk writes the table. Interrupted runs
resume: rerun the same command (same encoder and --encoder-batch-size).
Exit status: 0 written, 2 bad flags or inputs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional


from arra_megatron.data.builder import add_features
from arra_megatron.encoders import AGGREGATION_HELP, AGGREGATIONS, SPEC_HELP
from arra_megatron.runtime.capabilities import resolve_device

logger = logging.getLogger("precompute_features")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-prefix", required=True, help="dataset prefix (PREFIX.json, PREFIX.images.npy, ...)")
    p.add_argument("--encoder", required=True, help=f"frozen target encoder: {SPEC_HELP}")
    p.add_argument("--encoder-aggregation", default="cls", choices=AGGREGATIONS, help=AGGREGATION_HELP)
    p.add_argument("--encoder-batch-size", type=int, default=64, help="images per encoder batch")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the encoder (and DALI decoding) runs; auto picks CUDA when visible")
    p.add_argument("--num-threads", type=int, default=os.cpu_count() or 1, help="DALI CPU threads")
    p.add_argument("--overwrite", action="store_true", help="replace an existing feature table")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for flag in ("encoder_batch_size", "num_threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    try:
        add_features(args.data_prefix, args.encoder, args.encoder_aggregation, args.encoder_batch_size,
                     device=device, num_threads=args.num_threads, overwrite=args.overwrite)
    except (FileExistsError, FileNotFoundError, ValueError) as error:
        logger.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
