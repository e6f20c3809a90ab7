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


def test_flags_come_from_the_fields():
    """One flag per field: ``--arra-`` + the field's name (``enabled`` is ``--arra``)."""
    import dataclasses

    assert ARRAConfig.FLAGS["enabled"] == "--arra" and ARRAConfig.dest("enabled") == "arra"
    assert ARRAConfig.FLAGS["target_dim"] == "--arra-target-dim" and ARRAConfig.dest("z_loss_weight") == "arra_z_loss_weight"
    assert set(ARRAConfig.FLAGS) == {f.name for f in dataclasses.fields(ARRAConfig)}


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"condition_dropout_prob": 1.5}, "--arra-condition-dropout-prob must be in [0, 1]"),
        ({"z_loss_weight": -1.0}, "--arra-z-loss-weight must be >= 0"),
        ({"targets": "cached"}, "--arra-targets must be one of precomputed, online"),
        ({"targets": "online"}, "--arra-targets online needs --arra-encoder"),
    ],
)
def test_bad_values_of_the_other_arra_flags(kwargs, words):
    with pytest.raises(ARRAConfigError) as err:
        ARRAConfig(**kwargs)
    assert words in str(err.value)


def test_online_targets_against_the_run():
    online = ARRAConfig(targets="online", encoder="timm:resnet18", target_dim=16)
    with pytest.raises(ARRAConfigError, match="--arra-targets online .* --mock-data"):
        online.validate_for_model(**MODEL, mock_data=True)
    with pytest.raises(ARRAConfigError, match="--arra-encoder: encoder spec 'timm:resnet18' must look like"):
        online.validate_for_model(**MODEL)


def test_target_dim_defaults_to_what_records_it():
    """D comes from the feature table / encoder / checkpoint; the flag and any two of them must agree."""
    table = "the feature table of --data-path ds"
    assert ARRAConfig().with_target_dim({table: 6}).target_dim == 6
    assert ARRAConfig(target_dim=6).with_target_dim({table: 6, "--arra-encoder e": 6}).target_dim == 6
    with pytest.raises(ARRAConfigError) as err:
        ARRAConfig(target_dim=32).with_target_dim({table: 6})
    assert "--arra-target-dim 32 does not match the feature table of --data-path ds, whose D is 6" in str(err.value)
    with pytest.raises(ARRAConfigError) as err:
        ARRAConfig().with_target_dim({"the checkpoint of --load ckpt": 16, table: 6})
    assert "the checkpoint of --load ckpt has D 16 but the feature table of --data-path ds has D 6" in str(err.value)
    with pytest.raises(ARRAConfigError, match="nothing records D.*: set --arra-target-dim"):
        ARRAConfig().with_target_dim({})


def test_to_flags_parse_back_to_the_config():
    """``to_flags`` through the loop's own parser gives the same config (booleans as --no-*)."""
    from arra_megatron.training.megatron_loop import build_parser

    base = ["--num-layers", "2", "--hidden-size", "8", "--num-attention-heads", "2"]
    for config in (ARRAConfig(), ARRAConfig(enabled=False, loss_on_text=True),
                   ARRAConfig(align_layer=3, weight=0.5, objective="mse", target="rep", projector="pool",
                              target_dim=16, aggregation="avgpool", targets="online", encoder="timm:vit:/w.pt",
                              z_loss_weight=1e-5, condition_dropout_prob=0.1)):
        args = build_parser().parse_args(base + config.to_flags())
        assert ARRAConfig.from_args(args) == config, config.to_flags()
    assert ARRAConfig(enabled=False).to_flags() == ["--no-arra"]
