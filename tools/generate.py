#!/usr/bin/env python
"""Sample images from a trained ARRA model: PNG files, grid.png and samples.jsonl in --out-dir.

Examples:
    # text-to-image from a checkpoint of pretrain_arra.py, TP2 (gloo on CPU, NCCL on GPU)
    torchrun --nproc-per-node 2 tools/generate.py --load runs/t2i/ckpt --tensor-model-parallel-size 2 \\
        --prompts prompts.txt --num-samples 4 --cfg-scale 4 --top-k 1000 --seed 0 --out-dir samples/t2i

    # class-to-image from an exported Hugging Face directory (the dataset gives the token layout)
    python tools/generate.py --hf hf/arra-llamagen-b --data-path /data/arra/imagenet \\
        --class-ids 207 360 387 --num-samples 8 --cfg-scale 4 --top-k 2000 --out-dir samples/c2i

Exit status: 0 done, 2 bad flags or inputs.
"""

import sys
import warnings

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|absl|apex).*")
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

if __name__ == "__main__":  # dist checkpointing may spawn processes: the guard is required
    from arra_megatron.inference.cli import main

    sys.exit(main())
