"""Worker side of the layout-invariance tests: one global batch through one parallel layout."""

from __future__ import annotations

import os

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.distributed.param_and_grad_buffer import shard_buffer
from megatron.core.pipeline_parallel import get_forward_backward_func

from arra_megatron.config import ARRAConfig
from arra_megatron.runtime.distributed import initialize_model_parallel
from arra_megatron.testing import tiny
from arra_megatron.training.checkpointing import load_model_weights, save_model_weights
from arra_megatron.training.forward_step import ARRAForwardStep, read_metrics
from arra_megatron.training.model import build_model

SEQ = 32
TARGET_DIM = 16
GLOBAL_BATCH = 8


def arra_config(**overrides) -> ARRAConfig:
    return ARRAConfig(**{"align_layer": 1, "target_dim": TARGET_DIM, **overrides})


def _build(layout: dict, arra: ARRAConfig):
    tp, pp, vpp = layout.get("tp", 1), layout.get("pp", 1), layout.get("vpp")
    initialize_model_parallel(tp, pp, vpp, seed=layout.get("seed", 1234))
    recompute = layout.get("recompute")
    overrides = {}
    if recompute == "full":
        overrides = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute == "selective":
        overrides = dict(recompute_granularity="selective")
    if layout.get("dealloc"):  # Megatron-LM's default: stage outputs freed early, must be viewless
        overrides["deallocate_pipeline_outputs"] = True
    config = tiny.tiny_config(tp, pp, vpp, sequence_parallel=layout.get("sp", False),
                              num_layers=layout.get("num_layers", 4), **overrides)
    ddp = DistributedDataParallelConfig(
        use_distributed_optimizer=layout.get("distopt", False),
        overlap_grad_reduce=layout.get("overlap", False),
    )
    padded, real = layout.get("vocab", (tiny.VOCAB_SIZE, None))
    return build_model(config, arra, padded, SEQ, ddp_config=ddp, real_vocab_size=real)


def save_reference(ckpt_dir: str) -> None:
    """Random full weights (TP1/PP1), saved once with dist checkpointing.

    The projector is saved under ``arra_projector.`` whatever layer it taps, so the
    same checkpoint serves every ``align_layer``.
    """
    bundle = _build({"seed": 7}, arra_config())
    with torch.no_grad():  # RMSNorm weights start at one: make them matter too
        for name, param in bundle.chunks[0].named_parameters():
            if "layernorm" in name or "final_layernorm" in name:
                param.add_(0.1 * torch.randn_like(param))
            if "arra_projector" in name and "bias" in name:
                param.normal_(0.0, 0.02)
    save_model_weights(bundle.chunks, ckpt_dir)


def save_padded_references(ckpt_root: str, real: int, padded: dict) -> None:
    """The reference weights for a ``real``-id vocabulary at each padded size in ``padded``
    (name -> rows): the largest built and saved first, the others its leading rows. The rows
    past ``real`` hold large random values, so an unmasked padding id would change the loss."""
    sizes = sorted(padded.items(), key=lambda item: -item[1])
    big = None
    for name, rows in sizes:
        bundle = _build({"seed": 7, "vocab": (rows, real)}, arra_config())
        gpt, _ = _unwrap(bundle.chunks[0])
        with torch.no_grad():
            if big is None:
                for pname, param in gpt.named_parameters():
                    if "layernorm" in pname:
                        param.add_(0.1 * torch.randn_like(param))
                for weight in (gpt.embedding.word_embeddings.weight, gpt.output_layer.weight):
                    weight[real:] = 3.0 * torch.randn_like(weight[real:]) + 1.0
                big = {pname: param.detach().clone() for pname, param in bundle.chunks[0].named_parameters()}
            else:
                for pname, param in bundle.chunks[0].named_parameters():
                    param.copy_(big[pname][:param.size(0)])
        os.makedirs(f"{ckpt_root}/{name}", exist_ok=True)
        save_model_weights(bundle.chunks, f"{ckpt_root}/{name}")


def _unwrap(chunk):
    module = chunk.module  # DDP -> chunk
    return getattr(module, "module", module), getattr(module, "arra_projector", None)


def _tp_full(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return grad.clone()
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(grad) for _ in range(group.size())]
    torch.distributed.all_gather(parts, grad.contiguous(), group=group)
    return torch.cat(parts, dim=param.partition_dim)


def _gather_distributed_optimizer_grads(chunks) -> None:
    """After reduce-scatter each DP rank holds its shard of the reduced grads; rebuild the full buffers."""
    for chunk in chunks:
        for group in chunk.bucket_groups:
            comm = group.intra_distributed_optimizer_instance_group
            rank = torch.distributed.get_rank(comm)
            for bucket in group.buckets:
                shard = shard_buffer(bucket.grad_data, comm.size())[rank].clone()
                torch.distributed.all_gather_into_tensor(bucket.grad_data, shard, group=comm)


def collect_grads(bundle, num_layers: int, align_layer: int) -> dict:
    """Full (TP-gathered) gradients of the watched parameters held by this rank's stage."""
    wanted = {}
    for chunk in bundle.chunks:
        gpt, projector = _unwrap(chunk)
        if gpt.pre_process:
            wanted["word_embeddings"] = gpt.embedding.word_embeddings.weight
        if gpt.post_process:
            wanted["output_layer"] = gpt.output_layer.weight
        for layer in gpt.decoder.layers:
            if layer.layer_number == align_layer:
                wanted[f"layer{align_layer}.linear_qkv"] = layer.self_attention.linear_qkv.weight
            if layer.layer_number == num_layers:
                wanted[f"layer{num_layers}.linear_fc2"] = layer.mlp.linear_fc2.weight
        if projector is not None:
            for name, param in projector.named_parameters():
                wanted[f"projector.{name}"] = param
    return {name: _tp_full(p, p.main_grad).double() for name, p in sorted(wanted.items())}


def run_named_layouts(ckpt_dir: str, layouts: dict) -> dict:
    """Driver side: ``layouts`` maps a world size to [(name, layout)]; each world's layouts run in
    one set of gloo processes. Returns name -> {layout, metrics, grads (TP-gathered, all stages)};
    every rank must report the same metrics."""
    from arra_megatron.runtime.launch import run_workers

    out = {}
    for world, named in layouts.items():
        per_rank = run_workers(run_layouts, world, ckpt_dir, [layout for _, layout in named], timeout=600)
        for index, (name, layout) in enumerate(named):
            grads = {}
            for rank_results in per_rank:
                grads.update(rank_results[index]["grads"])
            metrics = [rank_results[index]["metrics"] for rank_results in per_rank]
            assert all(m == metrics[0] for m in metrics), f"{name}: ranks disagree on metrics {metrics}"
            out[name] = {"layout": layout, "metrics": metrics[0], "grads": grads}
    return out


def run_layouts(ckpt_dir: str, layouts: list) -> list:
    """``run_layout`` for each layout in turn, in the same processes."""
    return [run_layout(ckpt_dir, layout) for layout in layouts]


def run_layout(ckpt_dir: str, layout: dict) -> dict:
    """Load the reference weights into ``layout``, run one global batch, report losses and grads.

    ``layout`` keys: tp, pp, vpp, sp, distopt, overlap, recompute (full|selective), dealloc,
    vocab ((padded rows, real ids or None)), ckpt (a sub-directory of ``ckpt_dir`` to load),
    mbs (micro-batch size; the global batch is 8), z_loss, loss_scale (a constant fp16-style
    loss scale; gradients are divided by it again before comparison), arra (ARRAConfig overrides).
    """
    arra = arra_config(**layout.get("arra", {}))
    bundle = _build(layout, arra)
    load_model_weights(bundle.chunks, f"{ckpt_dir}/{layout['ckpt']}" if "ckpt" in layout else ckpt_dir)

    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    samples = tiny.synthetic_samples(GLOBAL_BATCH, SEQ, target_dim=TARGET_DIM, seed=11, text_only_every=3)
    mbs = tiny.microbatches(samples, layout.get("mbs", 2), dp_rank, dp)

    step = ARRAForwardStep(arra, tiny.IMAGE_TOKEN_RANGE, bundle.tap, z_loss_weight=layout.get("z_loss", 0.0),
                           num_microbatches=len(mbs))
    loss_scale = layout.get("loss_scale", 1.0)
    if loss_scale != 1.0:  # as the fp16 optimizer's scale_loss does
        bundle.config.grad_scale_func = lambda loss: loss * loss_scale
    for chunk in bundle.chunks:
        chunk.zero_grad_buffer()
    data = [iter(mbs) for _ in bundle.chunks] if len(bundle.chunks) > 1 else iter(mbs)
    losses = get_forward_backward_func()(
        forward_step_func=step, data_iterator=data, model=bundle.chunks, num_microbatches=len(mbs),
        seq_length=SEQ, micro_batch_size=layout.get("mbs", 2), forward_only=False,
    )
    metrics = read_metrics(step.end_step(losses))
    if layout.get("distopt"):
        _gather_distributed_optimizer_grads(bundle.chunks)
    grads = collect_grads(bundle, bundle.config.num_layers, arra.align_layer)
    grads = {name: grad / loss_scale for name, grad in grads.items()}
    keep = parallel_state.get_tensor_model_parallel_rank() == 0 and dp_rank == 0
    return {"metrics": metrics, "grads": grads if keep else {}}
