"""Worker: ARRA off is exactly a plain Megatron-Core GPTModel; ARRA on leaves its keys alone."""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.pipeline_parallel import get_forward_backward_func

from arra_megatron.config import ARRAConfig
from arra_megatron.models.specs import get_decoder_block_spec
from arra_megatron.runtime.distributed import initialize_model_parallel
from arra_megatron.testing import tiny
from arra_megatron.training.checkpointing import model_sharded_state_dict
from arra_megatron.training.forward_step import ARRAForwardStep, read_metrics
from arra_megatron.training.model import build_model

SEQ = 32


def _plain_gpt(config):
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    return GPTModel(config, get_decoder_block_spec(config), tiny.VOCAB_SIZE, SEQ,
                    position_embedding_type="rope")


def run() -> dict:
    initialize_model_parallel(1, 1)
    config = tiny.tiny_config()
    plain = _plain_gpt(config)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    off = build_model(config, ARRAConfig(enabled=False), tiny.VOCAB_SIZE, SEQ)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    on = build_model(config, ARRAConfig(target_dim=16), tiny.VOCAB_SIZE, SEQ)

    plain_sd, off_sd = plain.state_dict(), off.chunks[0].module.state_dict()
    same_weights = plain_sd.keys() == off_sd.keys() and all(
        torch.equal(plain_sd[k], off_sd[k]) for k in plain_sd if not k.endswith("_extra_state"))

    samples = tiny.synthetic_samples(4, SEQ, seed=3, text_only_every=4)
    mbs = tiny.microbatches(samples, 2)
    step = ARRAForwardStep(ARRAConfig(enabled=False), tiny.IMAGE_TOKEN_RANGE, num_microbatches=len(mbs))
    losses = get_forward_backward_func()(forward_step_func=step, data_iterator=iter(mbs), model=off.chunks,
                                         num_microbatches=2, seq_length=SEQ, micro_batch_size=2, forward_only=True)
    metrics = read_metrics(step.end_step(losses))
    with torch.no_grad():
        token_loss = plain(samples["tokens"], samples["position_ids"], None, labels=samples["labels"])
    direct = float((token_loss * samples["loss_mask"]).sum() / samples["loss_mask"].sum())

    on_chunk = on.chunks[0].module
    return {
        "same_weights": same_weights,
        "off_is_plain_type": type(off.chunks[0].module) is GPTModel,
        "lm loss": metrics["lm loss"], "direct": direct, "metric keys": sorted(metrics),
        "plain keys": sorted(plain_sd), "on gpt keys": sorted(on_chunk.module.state_dict()),
        "on chunk keys": sorted(on_chunk.state_dict()),
        "on sharded keys": sorted(model_sharded_state_dict(on.chunks)["model"]),
        "plain sharded keys": sorted(plain.sharded_state_dict()),
    }
