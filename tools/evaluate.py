#!/usr/bin/env python
"""Evaluate a folder of generated images: FID, IS, CLIP-Score, MS-SSIM -> a JSON report and a table.

Every network comes from a local file (nothing is downloaded):
  --inception-weights  torch-fidelity's InceptionV3 (weights-inception-2015-12-05-6726825d.pth), for IS and
                       the default FID features
  --fid-feature-net    inception | torchvision:ARCH:/path/state_dict.pth | xrv:/path/densenet.pt (chest X-rays)
                       | timm:ARCH:/path/weights.safetensors | python:MODULE:FUNCTION (a target encoder
                       spec as --encoder takes it; its own preprocessing, its pooled feature)
  --clip-model         an open_clip local-dir (open_clip_config.json + weights): CLIP, BiomedCLIP

Prompts for CLIP-Score: GENERATED/samples.jsonl (or --prompts), one line per image:
  {"file": "000000.png", "prompt": "PA view chest X-ray image, ..."}

Examples:
    # ImageNet 256: FID against an ADM/LlamaGen reference batch (.npz with mu, sigma) and IS
    python tools/evaluate.py --generated samples/ --ref VIRTUAL_imagenet256_labeled.npz \\
        --inception-weights weights/weights-inception-2015-12-05-6726825d.pth

    # reference statistics from a folder of real images, once
    python tools/evaluate.py --ref /data/mimic_test_512 --save-ref-stats mimic_test_xrv.npz \\
        --fid-feature-net xrv:/models/xrv-densenet121-all.pt --allow-pickled-weights

    # MIMIC-CXR as in the paper: XRV FID, BiomedCLIP CLIP-Score, MS-SSIM over 1000 random pairs
    python tools/evaluate.py --generated samples/ --ref mimic_test_xrv.npz \\
        --fid-feature-net xrv:/models/xrv-densenet121-all.pt --allow-pickled-weights --clip-model /models/BiomedCLIP \\
        --metrics fid clip-score ms-ssim

    # 50,000 images on every GPU of a node (each process scores every 8th image; one report)
    torchrun --nproc-per-node 8 tools/evaluate.py --generated samples_50k/ --ref VIRTUAL_imagenet256_labeled.npz \\
        --inception-weights weights/weights-inception-2015-12-05-6726825d.pth --device cuda

    # FID in the features of your own network (a function in a module on PYTHONPATH)
    PYTHONPATH=examples/study python tools/evaluate.py --generated samples/ --ref real/ --metrics fid \\
        --fid-feature-net python:arra_study_nets:mobilenetv2_imagenet

Unreadable or empty image files are skipped and counted in the report. Exit status: 0 done,
2 bad flags or inputs (missing weights, empty folder, malformed prompts file, ...).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

from arra_megatron.evaluation.metrics import METRICS, EvalConfig, evaluate, format_report
from arra_megatron.fileio import write_json_atomic

logger = logging.getLogger("evaluate")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generated", help="folder of generated images (searched recursively)")
    p.add_argument("--ref", help="reference: a folder of real images or a .npz statistics file (mu, sigma)")
    p.add_argument("--metrics", nargs="+", default=["fid", "is"], choices=METRICS, help="what to compute")
    p.add_argument("--inception-weights", help="torch-fidelity InceptionV3 weights file (local)")
    p.add_argument("--inception-features", default="2048", choices=["64", "192", "768", "2048"],
                   help="Inception pool used for FID (2048 is the standard)")
    p.add_argument("--fid-feature-net", default="inception",
                   help="inception | torchvision:ARCH:/path/weights.pth | xrv:/path/weights.pt | "
                        "timm:ARCH:/path/weights.safetensors | python:MODULE:FUNCTION (asked for aggregation cls)")
    p.add_argument("--allow-pickled-weights", action="store_true",
                   help="read a --fid-feature-net weights file that is a pickled model (torchxrayvision ships its "
                        "DenseNets so); unpickling runs code from the file: only for files you trust")
    p.add_argument("--clip-model", help="open_clip local-dir for CLIP-Score (CLIP, BiomedCLIP)")
    p.add_argument("--prompts", help="JSONL of {file, prompt} (default GENERATED/samples.jsonl)")
    p.add_argument("--ms-ssim-pairs", type=int, default=1000, help="random pairs of generated images for MS-SSIM")
    p.add_argument("--is-splits", type=int, default=10, help="IS splits (torch-fidelity's default 10)")
    p.add_argument("--image-size", type=int,
                   help="resize + centre-crop reference folder images to this square (mixed-size real sets)")
    p.add_argument("--save-ref-stats", metavar="OUT.npz", help="write the --ref folder's feature statistics")
    p.add_argument("--output", help="JSON report (default GENERATED/evaluation.json)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--workers", type=int, default=0, help="image decoding processes")
    p.add_argument("--seed", type=int, default=0, help="seed of the MS-SSIM pair draw")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = EvalConfig(generated=args.generated, ref=args.ref, metrics=tuple(dict.fromkeys(args.metrics)),
                         inception_weights=args.inception_weights, inception_features=args.inception_features,
                         fid_feature_net=args.fid_feature_net,
                         allow_pickled_weights=args.allow_pickled_weights, clip_model=args.clip_model, prompts=args.prompts,
                         ms_ssim_pairs=args.ms_ssim_pairs, is_splits=args.is_splits, image_size=args.image_size,
                         save_ref_stats=args.save_ref_stats, batch_size=args.batch_size, workers=args.workers,
                         seed=args.seed, device=args.device, progress=not args.no_progress)
        report = evaluate(cfg)
    except (FileNotFoundError, ValueError, ImportError) as error:
        logger.error("%s", error)
        return 2
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun: every process has the report; one writes it
        return 0
    output = args.output or (str(Path(args.generated) / "evaluation.json") if args.generated else None)
    if output:
        write_json_atomic(output, report)
        logger.info("wrote %s", output)
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
