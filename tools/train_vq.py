#!/usr/bin/env python
"""Train a VQ image tokenizer (transformers' JanusVQVAE, LlamaGen's VQ-16) for a domain without one.

The output directory is a save_pretrained JanusVQVAE that tools/build_indexed_dataset.py
(--image-tokenizer DIR) and tools/generate.py take unchanged, plus DIR/train_vq.json
(iterations, train/val reconstruction MSE and PSNR, codebook usage and perplexity on the
val images, wall time, flags). The quantiser, its losses and the codebook lookup are
LlamaGen's (arra_megatron/tokenization/vq_training.py); no perceptual or GAN loss.

Examples:
    # Fashion-MNIST-sized grey images (28 px, 4x down-sampling: 7x7 = 49 tokens), a few CPU minutes
    python tools/train_vq.py --input fmnist/train --output vq_fmnist --image-size 28 \\
        --channel-multiplier 1 1 2 --base-channels 32 --num-res-blocks 1 --latent-channels 32 \\
        --codebook-size 512 --codebook-dim 8 --batch-size 64 --lr 1e-3 --iters 600

    # 256 px images on a GPU, LlamaGen's VQ-16 shape (16x down-sampling)
    python tools/train_vq.py --input 'shards/{00000..00099}.tar' --output vq16 --image-size 256 \\
        --channel-multiplier 1 1 2 2 4 --iters 100000 --batch-size 64 --num-workers 8

--input takes what tools/build_indexed_dataset.py takes (tar shards, .csv/.jsonl, a
class-folder tree ROOT/CLASS/IMAGE) and also a plain directory of images.
Rerunning the same command after an interruption resumes from DIR/train_state.pt
(saved every --save-interval iterations); on CPU the result is bit-identical to an
uninterrupted run with the same number of threads.
Exit status: 0 trained (or stopped by --exit-after), 2 bad flags or inputs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

# OpenMP threads that sleep instead of spinning while they wait: on a CPU shared with other
# processes spinning threads made training steps ~3x slower (measured on 2 cores). Before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from arra_megatron.tokenization.vq_training import VQTrainConfig, train_vq  # noqa: E402

logger = logging.getLogger("train_vq")


def build_parser() -> argparse.ArgumentParser:
    defaults = VQTrainConfig(input="", output="")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="tar shards, a .csv/.jsonl file, a class-folder tree or a "
                                                  "directory of images")
    p.add_argument("--input-kind", default="auto", choices=["auto", "tar", "csv", "jsonl", "folder", "images"])
    p.add_argument("--image-root", help="directory that CSV/JSONL image paths are relative to")
    p.add_argument("--image-column", default="image", help="CSV/JSONL column holding the image path")
    p.add_argument("--output", required=True, help="save_pretrained directory to write (with train_vq.json)")
    p.add_argument("--image-size", type=int, required=True, help="square side the VQ model sees, in pixels")
    model = p.add_argument_group("model (JanusVQVAE)")
    model.add_argument("--channel-multiplier", type=int, nargs="+", default=defaults.channel_multiplier,
                       help="channels per resolution level; down-sampling is 2 ** (levels - 1), "
                            "e.g. 1 1 2 for 4x (28-32 px images)")
    model.add_argument("--base-channels", type=int, default=defaults.base_channels,
                       help="channels of the first level (a multiple of 32)")
    model.add_argument("--num-res-blocks", type=int, default=defaults.num_res_blocks,
                       help="residual blocks per level (the decoder has one more)")
    model.add_argument("--latent-channels", type=int, default=defaults.latent_channels,
                       help="encoder output channels before quant_conv")
    model.add_argument("--codebook-size", type=int, default=defaults.codebook_size, help="number of codes")
    model.add_argument("--codebook-dim", type=int, default=defaults.codebook_dim, help="code dimension (embed_dim)")
    loss = p.add_argument_group("loss")
    loss.add_argument("--reconstruction-loss", default=defaults.reconstruction_loss, choices=["mse", "l1"],
                      help="pixel loss (LlamaGen's default: mse)")
    loss.add_argument("--beta", type=float, default=defaults.beta, help="commitment loss weight")
    loss.add_argument("--restart-interval", type=int, default=defaults.restart_interval,
                      help="every N iterations re-initialise codes unused during them from random batch "
                           "latents (0: never)")
    train = p.add_argument_group("training")
    train.add_argument("--batch-size", type=int, default=defaults.batch_size)
    train.add_argument("--iters", type=int, default=defaults.iters, help="optimizer steps")
    train.add_argument("--lr", type=float, default=defaults.lr, help="Adam learning rate (betas 0.9, 0.95)")
    train.add_argument("--lr-schedule", default=defaults.lr_schedule, choices=["constant", "cosine"],
                       help="constant (LlamaGen), or cosine decay to lr / 10 at --iters")
    train.add_argument("--grad-clip", type=float, default=defaults.grad_clip, help="max gradient norm (0: off)")
    train.add_argument("--seed", type=int, default=defaults.seed, help="initialisation, val split, data order")
    train.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                       help="images held out for the report's reconstruction error on unseen images")
    train.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    train.add_argument("--num-workers", type=int, default=0, help="image decoding processes")
    train.add_argument("--cache-mb", type=float, default=defaults.cache_mb,
                       help="keep the preprocessed images in memory when they fit in this many MiB "
                            "(float32; 0: decode each batch's images again)")
    train.add_argument("--log-interval", type=int, default=defaults.log_interval, help="iterations per log line")
    train.add_argument("--save-interval", type=int, default=defaults.save_interval,
                       help="iterations per resumable state (DIR/train_state.pt)")
    train.add_argument("--exit-after", type=int, help="save the state and stop after this iteration")
    train.add_argument("--overwrite", action="store_true", help="replace a finished run (or an unfinished one's "
                                                                "state) in --output")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        train_vq(VQTrainConfig(**vars(args)))
    except (FileExistsError, FileNotFoundError, ValueError) as error:
        logger.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
