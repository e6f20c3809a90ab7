#!/usr/bin/env python
"""ARRA pretraining through Megatron-LM's own training loop (``megatron.training.pretrain``).
Launch with torchrun, e.g.

    torchrun --nproc-per-node 2 examples/pretrain_arra.py --config examples/configs/demo.yaml \\
        --mock-data --vocab-size 512 --tensor-model-parallel-size 2

Every Megatron-LM flag holds as Megatron-LM defines it (``--help`` lists them, ``--arra-*``
set the alignment loss); ``arra_megatron/training/megatron_loop.py`` holds the providers.
"""

import warnings

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|absl|apex).*")
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)


def main() -> None:
    from arra_megatron.training.megatron_loop import main as pretrain

    pretrain()  # every flag is checked before any process group exists


if __name__ == "__main__":  # dist checkpointing spawns processes: the guard is required
    main()
