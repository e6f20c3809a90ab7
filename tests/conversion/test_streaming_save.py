"""Guard of ``conversion/streaming_save.py`` (private torch / Megatron-Core internals): a chunk
saved through the streaming strategy, its parameters produced on demand for a meta-device
copy, loads back equal, tensor for tensor, to the same chunk saved with Megatron's stock
strategy (``checkpoints.save_model``). TP2, so that fc1's gate and up give two items each."""

from __future__ import annotations

import os

import torch

from arra_megatron.runtime.launch import run_workers

TP = 2


def save_both(root: str) -> None:
    """One TP rank: save a random bf16 chunk with the stock and the streaming strategy."""
    import dataclasses

    from arra_megatron.conversion.common import GPTArchitecture, global_parameter_names
    from arra_megatron.conversion.streaming_save import StreamingSaveStrategy
    from arra_megatron.runtime.distributed import initialize_model_parallel
    from arra_megatron.training import checkpoints, megatron_loop

    arch = GPTArchitecture(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                           num_query_groups=2, kv_channels=16, norm_epsilon=1e-5, rotary_base=10000.0,
                           vocab_size=128, tie_embeddings=False, max_position_embeddings=64)
    args = arch.megatron_args(TP, 1, "bfloat16", make_vocab_size_divisible_by=1)
    initialize_model_parallel(TP, 1, seed=7)
    config = megatron_loop.transformer_config(args)
    chunk = megatron_loop.build_gpt(args, config, arch.vocab_size, arch.vocab_size, pre_process=True,
                                    post_process=True)
    checkpoints.save_model([chunk], os.path.join(root, "stock"), args)

    meta_config = dataclasses.replace(config, perform_initialization=False, use_cpu_initialization=True,
                                      init_model_with_meta_device=True)
    with torch.device("meta"):
        meta = megatron_loop.build_gpt(args, meta_config, arch.vocab_size, arch.vocab_size, pre_process=True,
                                       post_process=True)
    real = dict(global_parameter_names(chunk))
    params = list(global_parameter_names(meta))
    assert all(p.is_meta for _, p in params)
    strategy = StreamingSaveStrategy(params, lambda name, param: real[name].detach().clone())
    checkpoints.save_model([meta], os.path.join(root, "streamed"), args, sharded_strategy=strategy)


def compare(root: str) -> dict:
    """One process: every tensor of both checkpoints read back in full; the keys, and those that differ."""
    from megatron.core import dist_checkpointing

    from arra_megatron.conversion.hf_export import read_full
    from arra_megatron.runtime.distributed import initialize_model_parallel

    initialize_model_parallel(1, 1)
    stock_path, streamed_path = os.path.join(root, "stock", "release"), os.path.join(root, "streamed", "release")
    stock = dist_checkpointing.load_tensors_metadata(stock_path)
    streamed = dist_checkpointing.load_tensors_metadata(streamed_path)
    differ = []
    for key in sorted(stock):
        a, b = read_full(stock_path, key, stock[key]), read_full(streamed_path, key, streamed[key])
        if a.dtype != b.dtype or not torch.equal(a, b):
            differ.append(key)
    return {"stock": sorted(stock), "streamed": sorted(streamed), "differ": differ,
            "bf16": [k for k in stock if stock[k].dtype == torch.bfloat16]}


def test_streaming_save_equals_stock(tmp_path):
    run_workers(save_both, TP, str(tmp_path), timeout=600)
    result = run_workers(compare, 1, str(tmp_path), timeout=600)[0]
    assert result["streamed"] == result["stock"]
    assert "decoder.layers.mlp.linear_fc1.weight" in result["stock"] and result["bf16"]
    assert result["differ"] == []
