#!/usr/bin/env python
"""Build an ARRA token dataset (Megatron-Core IndexedDataset + image references + manifest).

Examples:
    # LAION-COCO-style webdataset shards (img2dataset layout), text-to-image
    python tools/build_indexed_dataset.py --input 'shards/{00000..00099}.tar' \\
        --output-prefix data/laion --text-tokenizer tok.model --image-tokenizer vq16/ \\
        --image-size 256 --max-seq-length 320 --workers 8

    # MIMIC-CXR-style CSV with a prompt over columns
    python tools/build_indexed_dataset.py --input mimic.csv --image-root /data/mimic \\
        --image-column path --prompt-template '{view} view chest X-ray image, {impression}' ...

    # ImageNet class folders, class-to-image (no text tokenizer needed)
    python tools/build_indexed_dataset.py --input imagenet/train --input-kind folder ...

    # ... plus precomputed ARRA targets (PREFIX.features.npy) from a local open_clip model
    python tools/build_indexed_dataset.py ... --encoder open_clip:local-dir:/models/BiomedCLIP \\
        --encoder-aggregation cls

    # ... or from a timm model's local weights, or your own encoder function (see
    # arra_megatron/encoders/python_encoder.py for the contract)
    python tools/build_indexed_dataset.py ... --encoder timm:vit_small_patch16_224:/models/vit_s16.safetensors
    PYTHONPATH=examples/study python tools/build_indexed_dataset.py ... \\
        --encoder python:arra_study_nets:efficientnet_lite0 --encoder-aggregation avgpool

Rerunning the same command after a crash resumes: finished parts are kept.
Exit status: 0 built, 1 --strict and inputs were skipped, 2 bad flags or inputs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from arra_megatron.data.builder import BuildConfig, StrictModeError, build_dataset
from arra_megatron.encoders import AGGREGATION_HELP, AGGREGATIONS, SPEC_HELP

logger = logging.getLogger("build_indexed_dataset")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True,
                   help="tar shards (brace pattern, .tar, or a directory of .tar), a .csv/.jsonl file, "
                        "or a class-folder tree")
    p.add_argument("--input-kind", default="auto", choices=["auto", "tar", "csv", "jsonl", "folder"])
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin/.idx/.images.npy/.json")
    p.add_argument("--text-tokenizer", help="sentencepiece .model file or Hugging Face tokenizer directory "
                                            "(required unless the input is a class folder)")
    p.add_argument("--image-tokenizer", required=True,
                   help="save_pretrained directory of a transformers ChameleonVQVAE or JanusVQVAE")
    p.add_argument("--image-size", type=int, required=True, help="square side the VQ model sees, in pixels")
    p.add_argument("--max-seq-length", type=int, required=True,
                   help="most tokens per document; captions are cut to fit, image tokens never "
                        "(training with --seq-length S reads up to S + 1 tokens per document)")
    p.add_argument("--image-root", help="directory that CSV/JSONL image paths are relative to "
                                        "(default: the table's directory)")
    p.add_argument("--image-column", default="image", help="CSV/JSONL column holding the image path")
    p.add_argument("--caption-column", help="CSV/JSONL column holding the caption (default: caption)")
    p.add_argument("--prompt-template", help="caption from CSV/JSONL columns, e.g. "
                                             "'{view} view chest X-ray image, {impression}'")
    p.add_argument("--workers", type=int, default=1, help="worker processes (one per GPU on GPU machines)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the VQ encoder runs; auto picks CUDA when visible")
    p.add_argument("--num-parts", type=int, help="parts the input is split into (default: one per tar shard, "
                                                 "or one per 1000 rows/files); must stay the same to resume")
    p.add_argument("--batch-size", type=int, default=16, help="images per VQ encoder batch")
    p.add_argument("--strict", action="store_true", help="exit with status 1, without merging, if any input is skipped "
                                                         "(truncated captions are not skips)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished dataset at --output-prefix and discard unfinished parts")
    p.add_argument("--encoder", help="also write precomputed ARRA targets f_GF to PREFIX.features.npy with this "
                                     f"frozen encoder: {SPEC_HELP}; the same images and preprocessing training "
                                     "uses online")
    p.add_argument("--encoder-aggregation", default="cls", choices=AGGREGATIONS, help=AGGREGATION_HELP)
    p.add_argument("--encoder-batch-size", type=int, default=64, help="images per target-encoder batch")
    p.add_argument("--tokenizer-profile", metavar="PROFILE.json",
                   help="use a model's own vocabulary layout instead of appending image codes and special "
                        "tokens after the text vocabulary, e.g. CKPT/tokenizer_profile.json of a Chameleon "
                        "imported by tools/convert_checkpoint.py (with --image-tokenizer CKPT/vq_model)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron.core.datasets.indexed_dataset").setLevel(logging.WARNING)  # a line per part
    for flag in ("image_size", "max_seq_length", "workers", "batch_size", "num_parts", "encoder_batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            build_parser().error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    try:
        build_dataset(BuildConfig(**vars(args)))
    except StrictModeError as error:
        logger.error("%s", error)
        return 1
    except (FileExistsError, FileNotFoundError, ValueError) as error:
        logger.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
