"""Online ARRA targets: f_GF computed during training by the frozen encoder E_F.

Runs on the pipeline stage that holds layer k (where L_GVA is computed). The
micro-batch's images are split across that stage's tensor-parallel ranks, each
rank decodes (DALI: GPU "mixed" decode when present, CPU otherwise) and encodes its
share under no_grad (bf16 on GPU), and an all-gather over the TP group gives every
rank the whole [b, D]. An image that cannot be decoded comes back ``valid=False``
and its sample's L_GVA term is dropped (counted in ``failures``), training goes on.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch
from megatron.core import parallel_state

from arra_megatron.data.dali_pipeline import make_image_preprocessor
from arra_megatron.encoders import load_encoder


class OnlineTargets:
    def __init__(self, encoder_spec: str, aggregation: str, micro_batch_size: int, bf16: bool = True):
        device = torch.device(torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        try:
            self.encoder = load_encoder(encoder_spec, aggregation, device=device, bf16=bf16 and device.type == "cuda")
        except (ValueError, FileNotFoundError) as error:
            raise type(error)(f"--arra-encoder {encoder_spec} / --arra-aggregation {aggregation}: {error}") from error
        self.preprocess = make_image_preprocessor(self.encoder.spec, max_batch_size=micro_batch_size)
        self.dim = self.encoder.dim
        self.failures = 0

    def __call__(self, images: Sequence[np.ndarray]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(f_GF [b, D] float32, valid [b] bool) for one micro-batch's encoded images."""
        group = parallel_state.get_tensor_model_parallel_group()
        tp, rank = group.size(), group.rank()
        share = -(-len(images) // tp)  # ceil: every rank encodes the same number of rows (padding last)
        mine: List[np.ndarray] = list(images[rank * share:(rank + 1) * share])
        device = torch.cuda.current_device()
        targets = torch.zeros(share, self.dim, dtype=torch.float32, device=device)
        valid = torch.zeros(share, dtype=torch.float32, device=device)
        if mine:
            pre = self.preprocess([bytes(x) for x in mine])
            targets[: len(mine)] = self.encoder.encode(pre.pixels).to(device)
            valid[: len(mine)] = pre.valid.to(device=device, dtype=torch.float32)
            self.failures += int((~pre.valid.bool()).sum())
        if tp > 1:
            gathered_t = [torch.empty_like(targets) for _ in range(tp)]
            gathered_v = [torch.empty_like(valid) for _ in range(tp)]
            torch.distributed.all_gather(gathered_t, targets, group=group)
            torch.distributed.all_gather(gathered_v, valid, group=group)
            targets, valid = torch.cat(gathered_t), torch.cat(gathered_v)
        return targets[: len(images)], valid[: len(images)].bool()
