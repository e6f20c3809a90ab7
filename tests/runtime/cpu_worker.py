"""Worker checks of CPU mode (run in a fresh process: CPU mode is process-wide)."""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from arra_megatron import tiny
from arra_megatron.models.specs import SDPADotProductAttention, default_backend, get_decoder_block_spec
from arra_megatron.runtime import cpu_mode
from arra_megatron.runtime.distributed import initialize_model_parallel


def device_rewrites() -> dict:
    cpu_mode.enable_cpu_mode()
    x = torch.empty(3, device="cuda")
    y = torch.zeros(2, device=torch.device("cuda", 0))
    z = torch.ones(2).cuda()
    w = torch.ones(2).to("cuda:0")
    return {
        "devices": [str(t.device) for t in (x, y, z, w)],
        "current_device": torch.cuda.current_device(),
        "type": torch.ones(1).type(),
        "dtype_to_kept": str(torch.ones(1).to(torch.float64).dtype),
    }


def rng_tracker() -> dict:
    initialize_model_parallel(1, 1, seed=42)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    after = torch.get_rng_state()
    initialize_model_parallel(1, 1, seed=42)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        b = torch.rand(4)
    return {"restored": torch.equal(before, after), "deterministic": torch.equal(a, b)}


def sdpa_matches_megatron_attention() -> dict:
    initialize_model_parallel(1, 1)
    config = tiny.tiny_config(num_attention_heads=4, num_query_groups=2)
    kwargs = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    ours, theirs = SDPADotProductAttention(**kwargs), DotProductAttention(**kwargs)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(10, 3, 4, 16, generator=gen)
    k = torch.randn(10, 3, 2, 16, generator=gen)
    v = torch.randn(10, 3, 2, 16, generator=gen)
    spec = get_decoder_block_spec(config)
    return {
        "max_diff": float((ours(q, k, v, None) - theirs(q, k, v, None)).abs().max()),
        "backend": default_backend(),
        "core_attention": spec.layer_specs[0].submodules.self_attention.submodules.core_attention.__name__,
        "norm": spec.layer_norm.__name__,
    }
