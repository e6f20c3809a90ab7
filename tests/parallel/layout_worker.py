"""Worker side of the layout-invariance tests: one global batch through one parallel layout of
Megatron-LM's loop (``training/step_runner.py::loop_model``: ``megatron_loop.parse_args``,
``initialize_megatron``, ``setup_model_and_optimizer`` with ``megatron_loop.model_provider``,
the reference weights read by ``--load``; the schedule calls ``megatron_loop.forward_step``).

The vocabulary has 300 ids, which Megatron-LM pads to 384 rows at TP1 and 512 at TP2
(``--make-vocab-size-divisible-by 128`` x TP): every TP1/TP2 comparison crosses paddings.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.distributed.param_and_grad_buffer import shard_buffer

from arra_megatron import tiny
from arra_megatron.data.mock import mock_image_token_range
from arra_megatron.training import checkpoints, megatron_loop
from arra_megatron.training.forward_step import read_metrics
from arra_megatron.training.step_runner import loop_model

SEQ = 32
TARGET_DIM = 16
GLOBAL_BATCH = 8
NUM_LAYERS = 4
VOCAB = 300                                   # ids the samples use
IMAGE_RANGE = mock_image_token_range(VOCAB)   # (150, 300), as --mock-data lays a vocabulary of 300 out
ROWS = {1: 384, 2: 512}                       # padded vocabulary rows by TP size
MODEL = (
    f"--num-layers {NUM_LAYERS} --hidden-size 64 --num-attention-heads 4 --group-query-attention "
    f"--num-query-groups 2 --ffn-hidden-size 128 --normalization RMSNorm --swiglu --disable-bias-linear "
    f"--position-embedding-type rope --untie-embeddings-and-output-weights --hidden-dropout 0 --attention-dropout 0 "
    f"--seq-length {SEQ} --max-position-embeddings {SEQ} --global-batch-size {GLOBAL_BATCH} --train-iters 10 "
    f"--lr 1e-3 --mock-data --make-vocab-size-divisible-by 128 --arra-target-dim {TARGET_DIM}"
).split()


# (world size, layouts run in those processes), for test_layout_invariance.py and
# test_vocab_padding.py (one run, conftest.py). "k3" variants tap layer 3 of 4, which PP2
# puts on the second stage (and PP2 x VPP2 on rank 0's second virtual stage).
K3 = {"arra": {"align-layer": 3}}
MSE = {"arra": {"objective": "mse", "target": "rep", "projector": "pool"}}
REFERENCE = "TP1/PP1, 4 micro-batches (reference)"
UNMASKED = "TP1, padding ids unmasked"
LAYOUTS = {
    1: [
        (REFERENCE, {}),
        ("TP1/PP1, 1 micro-batch", {"mbs": 8}),
        ("TP1/PP1, 8 micro-batches", {"mbs": 1}),
        ("full recompute", {"recompute": "full"}),
        ("selective recompute", {"recompute": "selective"}),
        ("k=3 reference", K3),
        ("z-loss reference", {"z_loss": 1e-2}),
        ("mse/rep/pool reference", MSE),
        (UNMASKED, {"unmasked": True}),
    ],
    2: [
        ("TP2", {"tp": 2}),
        ("TP2 + SP", {"tp": 2, "sp": True}),
        ("TP2 + SP + full recompute", {"tp": 2, "sp": True, "recompute": "full"}),
        ("PP2", {"pp": 2}),
        ("PP2, k=3 on stage 2", {"pp": 2, **K3}),
        ("PP2 + full recompute, k=3", {"pp": 2, "recompute": "full", **K3}),
        ("PP2 x VPP2, k=1 ends a virtual stage", {"pp": 2, "vpp": 2}),
        ("PP2 x VPP2, k=3", {"pp": 2, "vpp": 2, **K3}),
        ("DP2 + distributed optimizer", {"distopt": True}),
        ("DP2 + overlapped grad reduce, 1 micro-batch each", {"overlap": True, "mbs": 4}),
        ("TP2 + SP + z-loss", {"tp": 2, "sp": True, "z_loss": 1e-2}),
        ("PP2, k=3, loss scale 1024", {"pp": 2, "loss_scale": 1024.0, **K3}),
        ("TP2 + SP, mse/rep/pool", {"tp": 2, "sp": True, **MSE}),
    ],
    4: [
        ("TP2 x PP2", {"tp": 2, "pp": 2}),
        ("TP2 x PP2 + SP + selective recompute, k=3", {"tp": 2, "pp": 2, "sp": True,
                                                       "recompute": "selective", **K3}),
    ],
}
#: The layouts of the masked model (every one but the unmasked control).
MASKED = [name for named in LAYOUTS.values() for name, _ in named if name != UNMASKED]


def reference_for(layout: dict) -> str:
    """The TP1/PP1 layout with the same loss settings as ``layout``."""
    if layout.get("z_loss"):
        return "z-loss reference"
    if layout.get("arra", {}).get("objective") == "mse":
        return "mse/rep/pool reference"
    if layout.get("arra", {}).get("align-layer") == 3:
        return "k=3 reference"
    return REFERENCE


def flags(layout: dict) -> list:
    """The loop's flags for ``layout``.

    ``layout`` keys: tp, pp, vpp, sp, distopt, overlap, recompute (full|selective), mbs
    (micro-batch size; the global batch is 8), z_loss, seed, arra (--arra-* flag name -> value),
    unmasked (a vocabulary of all the padded rows: the padding ids' logits are not masked).
    """
    tp, pp, vpp = layout.get("tp", 1), layout.get("pp", 1), layout.get("vpp")
    argv = MODEL + ["--tensor-model-parallel-size", tp, "--pipeline-model-parallel-size", pp,
                    "--micro-batch-size", layout.get("mbs", 2), "--seed", layout.get("seed", 1234),
                    "--vocab-size", ROWS[tp] if layout.get("unmasked") else VOCAB,
                    "--arra-z-loss-weight", layout.get("z_loss", 0.0)]
    if vpp:
        argv += ["--num-layers-per-virtual-pipeline-stage", NUM_LAYERS // (pp * vpp)]
    argv += ["--sequence-parallel"] if layout.get("sp") else []
    argv += ["--use-distributed-optimizer"] if layout.get("distopt") else []
    argv += ["--overlap-grad-reduce"] if layout.get("overlap") else []
    if layout.get("recompute") == "full":
        argv += ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", 1]
    elif layout.get("recompute") == "selective":
        argv += ["--recompute-granularity", "selective"]
    for name, value in {"align-layer": 1, **layout.get("arra", {})}.items():
        argv += [f"--arra-{name}", value]
    return [str(arg) for arg in argv]


def build(layout: dict, load: str = None):
    """The loop's model for ``layout`` (``load``: a checkpoint for ``--load``)."""
    argv = flags(layout) + (["--load", load] if load else [])
    data = megatron_loop.DataLayout(ROWS[layout.get("tp", 1)] if layout.get("unmasked") else VOCAB, IMAGE_RANGE)
    return loop_model(argv, data)


def save_reference(ckpt_dir: str) -> None:
    """Random full weights (TP1/PP1, 384 vocabulary rows), saved once as a Megatron-LM checkpoint
    (``ckpt_dir/release``: ``--load`` reads it at iteration 0, weights only).

    RMSNorm weights start at one and the projector's biases at zero: both are moved so they
    matter. The rows past the 300 ids hold large random values, so an unmasked padding id
    would change the loss. The projector is saved under ``arra_projector.`` whatever layer it
    taps, so the same checkpoint serves every ``--arra-align-layer``.
    """
    model = build({"seed": 7})
    gpt, _ = unwrap(model.chunks[0])
    with torch.no_grad():
        for name, param in model.chunks[0].named_parameters():
            if "layernorm" in name:
                param.add_(0.1 * torch.randn_like(param))
            if "arra_projector" in name and "bias" in name:
                param.normal_(0.0, 0.02)
        for weight in (gpt.embedding.word_embeddings.weight, gpt.output_layer.weight):
            weight[VOCAB:] = 3.0 * torch.randn_like(weight[VOCAB:]) + 1.0
    checkpoints.save_model(model.chunks, ckpt_dir, model.args)


def unwrap(chunk):
    """(GPTModel, ARRA projector or None) of a DDP-wrapped chunk."""
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


def collect_grads(chunks, align_layer: int) -> dict:
    """Full (TP-gathered) gradients of the watched parameters held by this rank's stage."""
    wanted = {}
    for chunk in chunks:
        gpt, projector = unwrap(chunk)
        if gpt.pre_process:
            wanted["word_embeddings"] = gpt.embedding.word_embeddings.weight
        if gpt.post_process:
            wanted["output_layer"] = gpt.output_layer.weight
        for layer in gpt.decoder.layers:
            if layer.layer_number == align_layer:
                wanted[f"layer{align_layer}.linear_qkv"] = layer.self_attention.linear_qkv.weight
            if layer.layer_number == NUM_LAYERS:
                wanted[f"layer{NUM_LAYERS}.linear_fc2"] = layer.mlp.linear_fc2.weight
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
            out[name] = {"layout": layout, "metrics": metrics[0], "grads": grads,
                         "rows": per_rank[0][index]["rows"]}
    return out


def run_layouts(ckpt_dir: str, layouts: list) -> list:
    """``run_layout`` for each layout in turn, in the same processes."""
    return [run_layout(ckpt_dir, layout) for layout in layouts]


def run_layout(ckpt_dir: str, layout: dict) -> dict:
    """Load the reference weights into ``layout``, run one global batch, report losses and grads.

    ``loss_scale`` in ``layout``: a constant fp16-style loss scale in place of the optimizer's
    (gradients are divided by it again before comparison).
    """
    model = build(layout, load=ckpt_dir)
    samples = tiny.synthetic_samples(GLOBAL_BATCH, SEQ, target_dim=TARGET_DIM, seed=11, text_only_every=3,
                                     image_token_range=IMAGE_RANGE)
    loss_scale = layout.get("loss_scale", 1.0)
    if loss_scale != 1.0:  # as the fp16 optimizer's scale_loss does
        model.config.grad_scale_func = lambda loss: loss * loss_scale
    metrics = read_metrics(model.step.end_step(model.schedule(model.microbatches(samples))))
    if layout.get("distopt"):
        _gather_distributed_optimizer_grads(model.chunks)
    grads = collect_grads(model.chunks, model.args.arra_align_layer)
    grads = {name: grad / loss_scale for name, grad in grads.items()}
    keep = parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0
    return {"metrics": metrics, "grads": grads if keep else {}, "rows": megatron_loop.padded_vocab_size(model.args)}
