"""Worker: in Megatron-LM's loop, ARRA off is exactly a plain Megatron-Core GPTModel; ARRA on
leaves its keys alone."""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel

from arra_megatron import tiny
from arra_megatron.models.specs import get_decoder_block_spec
from arra_megatron.training import checkpoints, megatron_loop
from arra_megatron.training.forward_step import read_metrics
from arra_megatron.training.step_runner import loop_model

SEQ = 32
SEED = 1234
# tiny's vocabulary (128 ids, images in the upper half) is the mock layout of --vocab-size 128.
FLAGS = (
    f"--num-layers 4 --hidden-size 64 --num-attention-heads 4 --group-query-attention --num-query-groups 2 "
    f"--ffn-hidden-size 128 --normalization RMSNorm --swiglu --disable-bias-linear --position-embedding-type rope "
    f"--untie-embeddings-and-output-weights --hidden-dropout 0 --attention-dropout 0 --seq-length {SEQ} "
    f"--max-position-embeddings {SEQ} --micro-batch-size 2 --global-batch-size 4 --train-iters 10 --lr 1e-3 "
    f"--mock-data --vocab-size {tiny.VOCAB_SIZE} --seed {SEED} --arra-target-dim 16"
).split()


def run() -> dict:
    off = loop_model(FLAGS + ["--no-arra"])
    off_gpt = off.chunks[0].module
    samples = tiny.synthetic_samples(4, SEQ, seed=3, text_only_every=4)
    metrics = read_metrics(off.step.end_step(off.schedule(off.microbatches(samples), forward_only=True)))

    # The same seeds as initialize_megatron gives the first pipeline stage, then a plain GPTModel.
    torch.manual_seed(SEED)
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)
    plain = GPTModel(off.config, get_decoder_block_spec(off.config, megatron_loop.layer_backend(off.args)),
                     tiny.VOCAB_SIZE, SEQ, position_embedding_type="rope")
    plain_sd, off_sd = plain.state_dict(), off_gpt.state_dict()
    same_weights = plain_sd.keys() == off_sd.keys() and all(
        torch.equal(plain_sd[k], off_sd[k]) for k in plain_sd if not k.endswith("_extra_state"))
    with torch.no_grad():
        token_loss = plain(samples["tokens"], samples["position_ids"], None, labels=samples["labels"])
    direct = float((token_loss * samples["loss_mask"]).sum() / samples["loss_mask"].sum())
    plain_sharded = sorted(plain.sharded_state_dict())

    on = loop_model(FLAGS)
    on_chunk = on.chunks[0].module
    return {
        "same_weights": same_weights,
        "off_is_plain_type": type(off_gpt) is GPTModel,
        "lm loss": metrics["lm loss"], "direct": direct, "metric keys": sorted(metrics),
        "plain keys": sorted(plain_sd), "on gpt keys": sorted(on_chunk.module.state_dict()),
        "on chunk keys": sorted(on_chunk.state_dict()),
        "on sharded keys": sorted(checkpoints.model_sharded_state_dict(on.chunks)["model"]),
        "plain sharded keys": plain_sharded,
    }
