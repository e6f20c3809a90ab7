"""The GPU path in one process on one GPU (NCCL): Transformer Engine layers, FP8 for the
model and the ARRA projector, and loading CPU/local-spec checkpoints into TE models.

Each model is Megatron-LM's loop's (``training/step_runner.py``: ``megatron_loop.parse_args`` of the
flags that describe the config, ``setup_model_and_optimizer`` with ``megatron_loop.model_provider``)
and starts from one Megatron-LM checkpoint written by the local (non-TE) spec, so the
comparisons are between precisions and implementations, not initialisations.
"""

from __future__ import annotations

import logging

import pytest
import torch

from arra_megatron.runtime.capabilities import has_gpu, has_transformer_engine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not has_gpu(), reason="needs a CUDA GPU; none is available here"),
    pytest.mark.skipif(not has_transformer_engine(), reason="needs Transformer Engine (not importable here)"),
]

SEQ, MBS, GBS, IMAGE_TOKENS, IMAGE_RANGE = 128, 4, 8, 96, (64, 64 + 1024)


@pytest.fixture(scope="module", autouse=True)
def single_gpu_world():
    """A world of one: the runners build the loop's model in this process, one at a time."""
    yield
    from arra_megatron.runtime.distributed import destroy_model_parallel
    from arra_megatron.training.step_runner import release

    release()
    destroy_model_parallel()


def _runner(backend: str, fp8=None, recipe="delayed", target_dim=128, checkpoint=None):
    from arra_megatron import tiny
    from arra_megatron.config import ARRAConfig
    from arra_megatron.training import checkpoints
    from arra_megatron.training.step_runner import build_runner

    config = tiny.tiny_config(num_layers=4, hidden_size=256, num_attention_heads=4, num_query_groups=2,
                              bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16,
                              fp8=fp8, fp8_recipe=recipe)
    runner = build_runner(config, ARRAConfig(align_layer=2, target_dim=target_dim), SEQ, MBS, GBS, seed=7,
                          backend=backend, num_image_tokens=IMAGE_TOKENS, image_range=IMAGE_RANGE)
    if checkpoint is not None:
        checkpoints.load_model(runner.bundle.chunks, checkpoints.resolve(str(checkpoint)))
    return runner


@pytest.fixture(scope="module")
def local_checkpoint(tmp_path_factory):
    """Weights of the local-spec model (no TE, no ``_extra_state``), and its bf16 metrics."""
    from arra_megatron.training import checkpoints

    path = tmp_path_factory.mktemp("local") / "weights"
    runner = _runner("local")
    checkpoints.save_model(runner.bundle.chunks, str(path), runner.bundle.args)
    metrics = runner(optimizer_step=False)
    grads = _grads(runner)
    del runner
    torch.cuda.empty_cache()
    return path, metrics, grads


def _grads(runner) -> dict:
    """Main gradients of the projector, layer k's QKV and the word embeddings, by name."""
    wanted = ("arra_projector.linear_fc1.weight", "arra_projector.linear_fc2.weight",
              "decoder.layers.1.self_attention.linear_qkv.weight", "embedding.word_embeddings.weight")
    out = {}
    for chunk in runner.bundle.chunks:
        for name, param in chunk.named_parameters():
            for key in wanted:
                if name.endswith(key):
                    out[key] = param.main_grad.detach().float().clone()
    assert set(out) == set(wanted), sorted(out)
    return out


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def _compare(metrics, grads, ref_metrics, ref_grads, loss_rtol, gva_rtol, min_cos):
    print({k: (metrics[k], ref_metrics[k]) for k in ("lm loss", "gva loss")},
          {k: round(_cos(grads[k], ref_grads[k]), 5) for k in grads})
    assert metrics["lm loss"] == pytest.approx(ref_metrics["lm loss"], rel=loss_rtol)
    assert metrics["gva loss"] == pytest.approx(ref_metrics["gva loss"], rel=gva_rtol)
    for key, grad in grads.items():
        assert torch.isfinite(grad).all(), key
        assert _cos(grad, ref_grads[key]) > min_cos, key


def test_te_spec_matches_local_spec_in_bf16(local_checkpoint):
    """A local-spec checkpoint (no FP8 metadata) loads into TE layers and TE projector
    linears, and gives the same losses and gradients up to bf16 rounding."""
    path, ref_metrics, ref_grads = local_checkpoint
    runner = _runner("te", checkpoint=path)
    import transformer_engine.pytorch as te

    assert isinstance(runner.bundle.tap.projector.linear_fc1, te.Linear)
    _compare(runner(optimizer_step=False), _grads(runner), ref_metrics, ref_grads,
             loss_rtol=5e-3, gva_rtol=5e-3, min_cos=0.999)


@pytest.mark.parametrize("fp8, recipe", [("hybrid", "delayed"), ("e4m3", "tensorwise")])
def test_fp8_close_to_bf16_and_projector_runs_in_fp8(local_checkpoint, fp8, recipe):
    path, ref_metrics, ref_grads = local_checkpoint
    runner = _runner("te", fp8=fp8, recipe=recipe, checkpoint=path)
    metrics = runner(optimizer_step=False)
    projector = runner.bundle.tap.projector
    # TE records whether its last forward ran under FP8 autocast.
    assert projector.linear_fc1.fp8 and projector.linear_fc2.fp8
    _compare(metrics, _grads(runner), ref_metrics, ref_grads, loss_rtol=2e-2, gva_rtol=5e-2, min_cos=0.95)
    # A few optimizer steps in FP8 keep every loss finite and move the lm loss down.
    first = metrics["lm loss"]
    for _ in range(5):
        last = runner()
    assert all(torch.isfinite(torch.tensor(v)) for v in last.values())
    assert last["lm loss"] < first


def test_fp8_projector_with_unaligned_shapes_falls_back_to_bf16(caplog):
    import arra_megatron.alignment.projector as projector_module

    projector_module._warned_fp8_shapes = False
    with caplog.at_level(logging.WARNING, logger=projector_module.__name__):
        runner = _runner("te", fp8="hybrid", target_dim=100)
    assert "FP8 GEMMs need feature sizes divisible by 16" in caplog.text
    assert type(runner.bundle.tap.projector.linear_fc1) is torch.nn.Linear
    metrics = runner(optimizer_step=False)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
