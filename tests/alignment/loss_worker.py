"""Worker side of the loss-reference tests: the tap on random hidden states, one process."""

from __future__ import annotations

import torch

from arra_megatron import tiny
from arra_megatron.alignment.loss import alignment_mask, num_aligned_samples, position_weights
from arra_megatron.alignment.tap import AlignmentInputs, ARRAStep, ARRATap
from arra_megatron.config import ARRAConfig
from arra_megatron.runtime.distributed import initialize_model_parallel


class _EchoLayer(torch.nn.Module):
    """Stands in for a transformer layer: returns its input as (hidden, context)."""

    def __init__(self, layer_number: int):
        super().__init__()
        self.layer_number = layer_number

    def forward(self, hidden):
        return hidden, None


class _Chunk(torch.nn.Module):
    def __init__(self, num_layers: int):
        super().__init__()
        self.config = tiny.tiny_config(num_layers=num_layers, hidden_size=32)
        self.decoder = torch.nn.Module()
        self.decoder.layers = torch.nn.ModuleList(_EchoLayer(i + 1) for i in range(num_layers))


def reference_gva(hidden, labels, targets, projector, objective, target, image_token_range):
    """ARRA_METHOD.md written out sample by sample. hidden: [s, b, H]."""
    lo, hi = image_token_range
    per_sample = []
    for b in range(labels.size(0)):
        positions = [t for t in range(labels.size(1)) if lo <= int(labels[b, t]) < hi]
        if target == "rep":
            positions = positions[:1]
        if not positions:
            continue  # samples without an image contribute nothing
        terms = []
        for t in positions:
            pred = projector(hidden[t, b])
            if objective == "cos":
                terms.append(1 - torch.dot(pred, targets[b]) / (pred.norm() * targets[b].norm()))
            else:
                terms.append(((pred - targets[b]) ** 2).sum() / targets[b].numel())
        per_sample.append(torch.stack(terms).mean())
    return torch.stack(per_sample).mean()


def explicit_max_pool(x: torch.Tensor, out: int) -> torch.Tensor:
    """Adaptive max pooling written out: bin i covers [floor(i*H/out), ceil((i+1)*H/out))."""
    size = x.numel()
    return torch.stack([x[(i * size) // out: -(-((i + 1) * size) // out)].max() for i in range(out)])


def run_case(arra_kwargs: dict) -> dict:
    initialize_model_parallel(1, 1)
    torch.manual_seed(0)
    arra = ARRAConfig(**{"target_dim": 16, "align_layer": 2, **arra_kwargs})
    chunk = _Chunk(num_layers=3)
    tap = ARRATap(arra, chunk.config, seed=3)
    tap.attach([chunk])
    tap.projector.double()  # float64 end to end: the comparison is about the formula, not rounding

    samples = tiny.synthetic_samples(6, 40, num_image_tokens=9, target_dim=16, seed=5, text_only_every=3)
    labels, targets = samples["labels"], samples["arra_targets"].double()
    hidden = torch.randn(40, 6, 32, dtype=torch.float64, requires_grad=True)
    mask = alignment_mask(labels, tiny.IMAGE_TOKEN_RANGE, arra.target)

    tap.begin_step(ARRAStep(num_aligned_samples=int(num_aligned_samples(mask))))
    with tap.microbatch(AlignmentInputs(position_weights(mask), targets)):
        out = chunk.decoder.layers[1](hidden)[0]
    # The GVA term is injected in backward; the forward output is h_k unchanged.
    assert torch.equal(out, hidden)
    out.backward(torch.zeros_like(out))  # no other loss: h gets lambda * dL_GVA/dh only
    sums = tap.take_sums()
    metrics = {"gva loss": sums[0] / int(num_aligned_samples(mask)), "gva cos": sums[1] / int(num_aligned_samples(mask))}
    ours_grad_h = hidden.grad
    ours_params = {n: p.grad.clone() for n, p in tap.projector.named_parameters()}

    hidden_ref = hidden.detach().clone().requires_grad_(True)
    projector = tap.projector
    if arra.projector == "pool":
        def projector(v):
            return explicit_max_pool(v, arra.target_dim)
    for p in tap.projector.parameters():
        p.grad = None
    ref = reference_gva(hidden_ref, labels, targets, projector, arra.objective, arra.target, tiny.IMAGE_TOKEN_RANGE)
    (arra.weight * ref).backward()
    ref_params = {n: p.grad.clone() for n, p in tap.projector.named_parameters()}

    cos_ref = reference_gva(hidden_ref.detach(), labels, targets, projector, "cos", arra.target,
                            tiny.IMAGE_TOKEN_RANGE)
    return {
        "gva loss": float(metrics["gva loss"]), "gva loss ref": float(ref),
        "gva cos": float(metrics["gva cos"]), "gva cos ref": 1.0 - float(cos_ref),
        "grad_h": ours_grad_h, "grad_h ref": hidden_ref.grad,
        "params": ours_params, "params ref": ref_params,
        "num aligned": int(num_aligned_samples(mask)),
    }
