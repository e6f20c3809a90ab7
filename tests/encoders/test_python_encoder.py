"""``python:MODULE:FUNCTION`` encoders: the user's module, called directly, is the reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from arra_megatron.encoders import load_encoder
from arra_megatron.encoders.preprocess import reference_preprocess
from tests.encoders.custom_encoders import MODULE, POOLED_DIM, SIZE, pooled_module, write_user_module
from tests.encoders.fixtures import image_zoo

torch.set_num_threads(1)  # the CPU is shared: one thread per test process is the fastest


def test_encodes_as_the_users_module(user_module):
    encoder = load_encoder(f"python:{MODULE}:pooled", "avgpool")
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = pooled_module()(x)
    torch.testing.assert_close(encoder.encode(x), expected, rtol=0, atol=0)
    assert encoder.dim == POOLED_DIM and encoder.aggregation == "avgpool"
    spec = encoder.spec
    assert (spec.library, spec.image_size, spec.resize_mode, spec.resize_rounding, spec.window, spec.fill_color) == \
        ("python", SIZE, "shortest", "floor", "center", 0)
    identity = encoder.identity
    assert identity["family"] == "python" and identity["name"] == f"{MODULE}:pooled"
    assert (identity["module"], identity["function"]) == (MODULE, "pooled")
    assert identity["path"] == str((user_module / f"{MODULE}.py").resolve())
    assert identity["weights_files"] == [str((user_module / "arra_user_weights.pt").resolve())]
    assert identity["dim"] == POOLED_DIM and identity["preprocessing"] == spec.to_dict()


def test_aggregation_is_passed_to_the_function(user_module):
    assert load_encoder(f"python:{MODULE}:only_avgpool", "avgpool").dim == POOLED_DIM
    with pytest.raises(ValueError, match=r"only_avgpool\('cls', 'cpu'\) raised ValueError: only avgpool"):
        load_encoder(f"python:{MODULE}:only_avgpool", "cls")


def test_reference_is_chosen_by_the_window(user_module):
    """A hand-written spec is implemented by open_clip's transform (centre) or SAM's processor (top-left);
    greyscale images come out RGB."""
    images = [data for _, data in image_zoo()]
    for function, library in (("pooled", "open_clip"), ("pooled_top_left", "sam")):
        spec = load_encoder(f"python:{MODULE}:{function}", "cls").spec
        pixels = reference_preprocess(spec, images)
        assert pixels.shape == (len(images), 3, SIZE, SIZE)
        torch.testing.assert_close(pixels, reference_preprocess(dataclasses.replace(spec, library=library), images),
                                   rtol=0, atol=0)


def test_identity_follows_source_and_weights(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    name = "arra_user_encoders_changing"
    source = write_user_module(tmp_path, name, seed=0)
    try:
        first = load_encoder(f"python:{name}:pooled", "cls").identity
        assert load_encoder(f"python:{name}:pooled", "cls").identity == first  # deterministic
        write_user_module(tmp_path, name, seed=1)  # other weights, same source
        second = load_encoder(f"python:{name}:pooled", "cls").identity
        assert second["sha256"] != first["sha256"] and second["source_sha256"] == first["source_sha256"]
        source.write_text(source.read_text() + "\n# edited\n")
        third = load_encoder(f"python:{name}:pooled", "cls").identity
        assert third["source_sha256"] != second["source_sha256"] and third["sha256"] != second["sha256"]
    finally:
        import sys
        sys.modules.pop(name, None)


CONTRACT = "FUNCTION(aggregation, device)"
BAD = {
    "missing_module": ("python:arra_no_such_module:pooled", "cannot import 'arra_no_such_module'"),
    "missing_function": (f"python:{MODULE}:absent", "has no function 'absent'"),
    "not_a_function": (f"python:{MODULE}:NOT_A_FUNCTION", "has no function 'NOT_A_FUNCTION'"),
    "function_raises": (f"python:{MODULE}:raises", "raised RuntimeError: the weights are on another machine"),
    "not_a_tuple": (f"python:{MODULE}:not_a_tuple", "returned Pooled, expected"),
    "wrong_shape": (f"python:{MODULE}:wrong_shape", r"gave torch.float32 \(2, 3, 32, 32\) for 2 images"),
    "wrong_batch": (f"python:{MODULE}:wrong_batch", r"gave torch.float32 \(1, 3\) for 2 images"),
    "integer_features": (f"python:{MODULE}:integer_features", "gave torch.int64"),
    "forward_fails": (f"python:{MODULE}:forward_fails", "forward on a zero batch"),
    "rounding_mismatch": (f"python:{MODULE}:rounding_mismatch", "rounds 'floor'; leave it out"),
    "unknown_field": (f"python:{MODULE}:unknown_field", r"unknown \['crop_pct'\]"),
    "no_reference": (f"python:{MODULE}:no_reference", "has no reference implementation"),
    "missing_weights": (f"python:{MODULE}:missing_weights", "arra_user_weights.pt.absent, which does not exist"),
    "malformed": ("python:arra_user_encoders", "must look like one of"),
    "not_a_module_name": ("python:arra-user:pooled", "dotted module name"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_broken_contract_fails_at_load(user_module, case):
    spec, message = BAD[case]
    with pytest.raises(ValueError, match=message) as error:
        load_encoder(spec, "cls")
    if case != "malformed":
        assert spec in str(error.value) and (CONTRACT in str(error.value) or "preprocess" in str(error.value)
                                             or "weights_files" in str(error.value))


def test_encode_checks_the_output_every_call(user_module):
    encoder = load_encoder(f"python:{MODULE}:pooled", "cls")
    encoder.model.proj = torch.nn.Linear(48, POOLED_DIM + 1)  # changed after loading
    with pytest.raises(ValueError, match=rf"expected floating-point \[2, {POOLED_DIM}\]"):
        encoder.encode(torch.zeros(2, 3, SIZE, SIZE))
