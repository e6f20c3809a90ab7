#!/usr/bin/env python
"""ARRA pretraining on Megatron-Core. Launch with torchrun, e.g.

    torchrun --nproc-per-node 2 examples/pretrain_arra.py --config examples/configs/demo.yaml \\
        --tensor-model-parallel-size 2

Flags follow Megatron-LM (``--help`` lists them); ``--arra-*`` flags set the alignment loss.
"""

import warnings

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|absl|apex).*")
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)


def main() -> None:
    from arra_megatron.training.arguments import parse_args

    args = parse_args()  # every flag is checked before any process group exists
    from arra_megatron.training.trainer import Trainer

    Trainer(args).train()


if __name__ == "__main__":  # dist checkpointing spawns processes: the guard is required
    main()
