import pytest

from tests.inference.fixtures import trained_model


@pytest.fixture(scope="session")
def model(tmp_path_factory):
    """A tiny text-to-image model trained by the training loop on a dataset built by the builder."""
    return trained_model(tmp_path_factory.mktemp("generate"))


@pytest.fixture(scope="session")
def hf_dir(model):
    """The model exported by the project's converter (tools/convert_checkpoint.py export)."""
    from arra_megatron.conversion.hf_export import export_checkpoint

    out = model.root / "hf"
    export_checkpoint(str(model.checkpoint), str(out), tokenizer=str(model.tokenizer))
    return out
