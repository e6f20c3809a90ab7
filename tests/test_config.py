"""Wrong ARRA settings fail at construction, naming the flag to change."""

from __future__ import annotations

import pytest

from arra_megatron.config import ARRAConfig, ARRAConfigError

MODEL = dict(num_layers=4, hidden_size=64, tensor_model_parallel_size=1)


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"objective": "l1"}, "--arra-objective"),
        ({"target": "all"}, "--arra-target"),
        ({"projector": "linear"}, "--arra-projector"),
        ({"aggregation": "max"}, "--arra-aggregation"),
        ({"align_layer": 0}, "--arra-align-layer"),
        ({"weight": -1.0}, "--arra-weight"),
        ({"target_dim": 0}, "--arra-target-dim"),
    ],
)
def test_bad_values(kwargs, flag):
    with pytest.raises(ARRAConfigError, match=flag):
        ARRAConfig(**kwargs)


def test_layer_outside_model():
    with pytest.raises(ARRAConfigError, match=r"--arra-align-layer 5 is outside 1\.\.4"):
        ARRAConfig(align_layer=5).validate_for_model(**MODEL)
    ARRAConfig(align_layer=4, target_dim=16).validate_for_model(**MODEL)


def test_target_dim_must_match_encoder():
    with pytest.raises(ARRAConfigError, match="--arra-target-dim 512 does not match .* 768"):
        ARRAConfig(target_dim=512).validate_for_model(**MODEL, encoder_dim=768)
    ARRAConfig(target_dim=768).validate_for_model(**MODEL, encoder_dim=768)


def test_pool_cannot_grow():
    with pytest.raises(ARRAConfigError, match="--arra-projector pool"):
        ARRAConfig(projector="pool", target_dim=128).validate_for_model(**MODEL)
    ARRAConfig(projector="mlp", target_dim=128).validate_for_model(**MODEL)


def test_hidden_size_divisible_by_tp():
    with pytest.raises(ARRAConfigError, match="--hidden-size 64 is not divisible by --tensor-model-parallel-size 3"):
        ARRAConfig().validate_for_model(num_layers=4, hidden_size=64, tensor_model_parallel_size=3)


def test_rep_needs_an_image_span():
    with pytest.raises(ARRAConfigError, match="--arra-target rep"):
        ARRAConfig(target="rep", target_dim=16).validate_for_model(**MODEL, layout_has_images=False)


def test_disabled_skips_alignment_checks():
    ARRAConfig(enabled=False, align_layer=99).validate_for_model(**MODEL, layout_has_images=False)
