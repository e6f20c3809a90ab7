"""Evaluation of generated images: FID, IS, CLIP-Score, MS-SSIM (``metrics``), run comparison (``runs``).

The arithmetic is the metric libraries' own (torch-fidelity, torchmetrics); this package
reads image folders robustly, loads every network from local files, and writes reports.
"""

from arra_megatron.evaluation.metrics import (METRICS, EvalConfig, FeatureStats, evaluate, format_report,
                                              frechet_distance, inception_score, random_pairs)

__all__ = ["METRICS", "EvalConfig", "FeatureStats", "evaluate", "format_report", "frechet_distance",
           "inception_score", "random_pairs"]
