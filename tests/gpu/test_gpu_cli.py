"""The trainer CLI on one GPU under torchrun (NCCL): bf16 + FP8 with Transformer Engine,
an exact-enough resume (FP8 scaling state is in the checkpoint), the local spec, and
online targets with DALI decoding on the GPU."""

from __future__ import annotations

import pytest

from arra_megatron.runtime.capabilities import has_dali_gpu, has_gpu, has_transformer_engine
from tests.training.test_cli import ok, records, torchrun
from tests.training.test_targets import MODEL

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not has_gpu(), reason="needs a CUDA GPU; none is available here")]
GPU = {"ARRA_CPU_MODE": "0"}
FP8 = ["--bf16", "--fp8-format", "hybrid", "--fp8-amax-history-len", "16", "--fp8-amax-compute-algo", "max"]


@pytest.mark.skipif(not has_transformer_engine(), reason="needs Transformer Engine (not importable here)")
@pytest.mark.parametrize("recipe, rel", [
    ("tensorwise", 1e-3),  # stateless scaling: the resumed run is the uninterrupted one up to GPU reduction order
    ("delayed", 3e-2),     # TE's pickled amax history is never loaded (checkpointing.py): it rebuilds after resume
])
def test_fp8_training_resumes_like_an_uninterrupted_run(tmp_path, recipe, rel):
    flags = [*FP8, "--fp8-recipe", recipe]
    ok(torchrun(1, *flags, "--train-iters", "6", "--log-json", str(tmp_path / "full.jsonl"), env=GPU))
    ok(torchrun(1, *flags, "--train-iters", "6", "--save", str(tmp_path / "ckpt"), "--save-interval", "3",
                "--exit-interval", "3", "--log-json", str(tmp_path / "a.jsonl"), env=GPU))
    ok(torchrun(1, *flags, "--train-iters", "6", "--load", str(tmp_path / "ckpt"), "--save",
                str(tmp_path / "ckpt"), "--log-json", str(tmp_path / "b.jsonl"), env=GPU))
    full, resumed = records(tmp_path / "full.jsonl"), records(tmp_path / "b.jsonl")
    assert sorted(resumed) == [4, 5, 6]
    for it in (4, 5, 6):
        for key in ("lm_loss", "gva_loss", "grad_norm"):
            print(it, key, full[it][key], resumed[it][key])
            assert resumed[it][key] == pytest.approx(full[it][key], rel=rel), (it, key)
    assert full[6]["lm_loss"] < full[1]["lm_loss"]


def test_local_spec_on_gpu_trains(tmp_path):
    ok(torchrun(1, "--bf16", "--transformer-impl", "local", "--train-iters", "3",
                "--log-json", str(tmp_path / "log.jsonl"), env=GPU))
    curve = records(tmp_path / "log.jsonl")
    assert sorted(curve) == [1, 2, 3]


@pytest.mark.skipif(not has_dali_gpu(), reason="DALI GPU decoding needs nvidia-dali and a GPU")
def test_online_targets_on_gpu_match_precomputed(dataset, tmp_path):
    """DALI "mixed" decode + the encoder on the GPU give the precomputed (CPU) L_GVA."""
    prefix = str(dataset / "data" / "ds")
    common = ["--data-path", prefix, "--split", "100,0,0", *MODEL]
    ok(torchrun(1, *common, "--log-json", str(tmp_path / "pre.jsonl"), drop_mock=True, env=GPU))
    ok(torchrun(1, *common, "--arra-targets", "online", "--arra-encoder",
                f"open_clip:local-dir:{dataset / 'clip'}", "--log-json", str(tmp_path / "online.jsonl"),
                drop_mock=True, env=GPU))
    pre, online = records(tmp_path / "pre.jsonl"), records(tmp_path / "online.jsonl")
    # The encoder runs in bf16 on the GPU and nvJPEG/resize differ slightly from the CPU path.
    assert online[1]["gva_loss"] == pytest.approx(pre[1]["gva_loss"], rel=2e-2)
