"""--arra-encoder with the timm: and python: kinds: a malformed spec fails in parse_args, a broken one when
the online targets load (naming the flag), a good one gives the encoder's targets of the batch's images."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from megatron.core import parallel_state

from arra_megatron.encoders.preprocess import reference_preprocess
from arra_megatron.training.targets import OnlineTargets
from tests.encoders.custom_encoders import MODULE, POOLED_DIM
from tests.support.tiny_data import encode_image, make_image
from tests.training.test_args import DATASET, write_dataset

torch.set_num_threads(1)


@pytest.mark.parametrize("spec", ["python:only_a_module", "timm:/weights/without/arch.safetensors", "dino:/x"])
def test_malformed_spec_fails_in_parse_args(rejected, tmp_path, spec):
    write_dataset(tmp_path / "ds")
    err = rejected(DATASET + ["--data-path", str(tmp_path / "ds"), "--arra-targets", "online", "--arra-encoder", spec])
    assert f"--arra-encoder: encoder spec {spec!r} must look like one of" in err


def test_broken_encoder_names_the_flag(user_module):
    with pytest.raises(ValueError, match=f"^--arra-encoder python:{MODULE}:absent / --arra-aggregation cls: .*"
                                         "has no function 'absent'"):
        OnlineTargets(f"python:{MODULE}:absent", "cls", micro_batch_size=2)


def test_python_encoder_online_targets(user_module, monkeypatch):
    """One TP rank: targets are the encoder on the images' library-transform pixels; a bad image is masked."""
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_group",
                        lambda: SimpleNamespace(size=lambda: 1, rank=lambda: 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    online = OnlineTargets(f"python:{MODULE}:pooled", "avgpool", micro_batch_size=3)
    assert online.dim == POOLED_DIM
    images = [encode_image(make_image(1, (50, 40)), "PNG"), b"not an image", encode_image(make_image(2), "JPEG")]
    targets, valid = online(images)
    assert valid.tolist() == [True, False, True] and online.failures == 1
    expected = online.encoder.encode(reference_preprocess(online.encoder.spec, [images[0], images[2]]))
    torch.testing.assert_close(targets[valid], expected, rtol=0, atol=0.02)  # DALI vs the library transform
