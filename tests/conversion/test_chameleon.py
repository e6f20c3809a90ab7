"""Chameleon <-> Megatron conversion: a tiny random ChameleonForConditionalGeneration (GQA,
per-head q/k LayerNorm with biases, a synthetic image vocabulary) imported at TP2 x PP2 gives
the trainer's loss and logits transformers gives; exported back, the same weights (VQ-VAE
included) and logits."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from arra_megatron.conversion.common import ConversionError  # noqa: E402
from arra_megatron.conversion.hf_export import export_checkpoint  # noqa: E402
from arra_megatron.conversion.hf_import import import_checkpoint  # noqa: E402
from arra_megatron.data.samples import collate, sample_from_document  # noqa: E402
from arra_megatron.runtime.launch import run_workers  # noqa: E402
from arra_megatron.tokenization.profile import TokenizerProfile, content_sha256  # noqa: E402
from arra_megatron.training.checkpoints import IMPORT_RECORD_FILE  # noqa: E402
from tests.conversion.fixtures import (  # noqa: E402
    CHAMELEON_CODEBOOK,
    IMAGE_RANGE,
    assert_matches_transformers,
    assert_same_checkpoint,
    chameleon_reference,
    make_chameleon,
)
from tests.conversion.llama_worker import SEQ, megatron_outputs  # noqa: E402

TP, PP = 2, 2


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("chameleon")
    hf_dir = make_chameleon(root / "hf")
    record = import_checkpoint(hf_dir, str(root / "ckpt"), TP, PP)
    return {"hf": hf_dir, "ckpt": str(root / "ckpt"), "record": record, "root": root}


def profile_samples(profile: TokenizerProfile, n: int = 4, seed: int = 3) -> dict:
    """Samples laid out by the imported profile: text, BOI, the image's codes through Chameleon's
    code -> token table, EOI, EOS."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        condition = rng.integers(6, IMAGE_RANGE[0], size=int(rng.integers(1, 10))).tolist()
        codes = rng.integers(0, profile.image_codebook_size, size=profile.tokens_per_image)
        doc, _ = profile.build_sequence(condition, codes, SEQ + 1)
        samples.append(sample_from_document(doc, SEQ, profile.image_token_range, profile.special.eoi,
                                            profile.special.pad))
    batch = collate(samples)
    return {k: batch[k] for k in ("tokens", "labels", "loss_mask", "position_ids")}


def test_import_writes_the_profile_and_vq_model(imported):
    ckpt, record = imported["ckpt"], imported["record"]
    assert "--qk-layernorm-per-head" in record["trainer_flags"]
    with open(os.path.join(ckpt, record["tokenizer_profile"])) as f:
        profile = TokenizerProfile.from_dict(json.load(f))
    from transformers.models.chameleon.modeling_chameleon import ChameleonImageVocabularyMapping

    config = transformers.ChameleonConfig.from_pretrained(imported["hf"])
    img2bpe = ChameleonImageVocabularyMapping(config.vocabulary_map).img2bpe
    assert list(profile.image_token_ids) == [img2bpe[c] for c in range(CHAMELEON_CODEBOOK)]
    assert list(profile.image_token_ids) != list(range(*IMAGE_RANGE))  # a real permutation
    assert profile.image_token_range == IMAGE_RANGE and profile.vocab_size == 128
    s = profile.special
    assert (s.pad, s.bos, s.eos, s.boi, s.eoi) == (0, 1, 2, 3, 4)
    assert profile.tokens_per_image == 16 and profile.image_size == 16
    # The VQ-VAE directory is what the dataset builder takes as --image-tokenizer.
    from arra_megatron.tokenization.image import ImageTokenizer

    vq = ImageTokenizer(os.path.join(ckpt, "vq_model"), profile.image_size)
    assert vq.identity == profile.vq_model
    assert profile.vq_model.sha256 == content_sha256(os.path.join(ckpt, "vq_model"))
    assert vq.preprocessing == dict(profile.image_preprocessing)


def test_import_matches_transformers(imported):
    ckpt, record = imported["ckpt"], imported["record"]
    with open(os.path.join(ckpt, IMPORT_RECORD_FILE)) as f:
        assert json.load(f)["trainer_flags"] == record["trainer_flags"]
    with open(os.path.join(ckpt, record["tokenizer_profile"])) as f:
        profile = TokenizerProfile.from_dict(json.load(f))
    batch = profile_samples(profile)
    results = run_workers(megatron_outputs, TP * PP, ckpt, record["trainer_flags"], TP, PP, batch,
                          profile.image_token_range)
    hf_logits, hf_loss, masked = chameleon_reference(imported["hf"], batch)
    # transformers' forward hides the image tokens (see chameleon_reference): not comparable there.
    assert torch.all(masked[..., list(profile.image_token_ids)] == torch.finfo(masked.dtype).min)
    assert_matches_transformers("chameleon", results, hf_logits, hf_loss, profile.vocab_size)


def test_export_round_trip(imported):
    out = imported["root"] / "exported"
    summary = export_checkpoint(imported["ckpt"], str(out), "chameleon", max_shard_size="100KB")
    assert summary["left_out"] == []
    exported = assert_same_checkpoint(imported["hf"], str(out), (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "hidden_act", "rms_norm_eps", "rope_parameters", "tie_word_embeddings",
        "attention_bias", "mlp_bias", "max_position_embeddings", "swin_norm", "vocabulary_map", "vq_config",
        "image_token_id", "architectures"))
    assert any(n.startswith("model.vqmodel.") for n in exported)
    generation = transformers.GenerationConfig.from_pretrained(str(out))
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 2, 0)
    tokens = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = transformers.ChameleonForConditionalGeneration.from_pretrained(imported["hf"], dtype=torch.float32)
        got = transformers.ChameleonForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32)
        assert torch.equal(ref.lm_head(ref.model(tokens).last_hidden_state),
                           got.lm_head(got.model(tokens).last_hidden_state))
    with pytest.raises(ConversionError, match="holds a chameleon model, not --model-type llama"):
        export_checkpoint(imported["ckpt"], str(imported["root"] / "as_llama"), "llama")


def test_unsupported_chameleon_variants(tmp_path, imported):
    config = transformers.ChameleonConfig.from_pretrained(imported["hf"])
    config.swin_norm = True
    config.save_pretrained(tmp_path / "swin")
    with pytest.raises(ConversionError, match="swin_norm=True .* not supported"):
        import_checkpoint(str(tmp_path / "swin"), str(tmp_path / "out"))
    config = transformers.ChameleonConfig.from_pretrained(imported["hf"])
    config.rms_norm_eps = 1e-6
    config.save_pretrained(tmp_path / "eps")
    with pytest.raises(ConversionError, match="rms_norm_eps 1e-06"):
        import_checkpoint(str(tmp_path / "eps"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_dataset_built_with_the_imported_profile(imported, tmp_path):
    """tools/build_indexed_dataset.py --tokenizer-profile: documents use Chameleon's own ids (the
    code -> token table, its BOI/EOI), with the VQ-VAE directory the import wrote."""
    import importlib.util

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from arra_megatron.tokenization.image import ImageTokenizer, load_rgb
    from tests.support.tiny_data import encode_image, make_image

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("build_tool", os.path.join(root, "tools",
                                                                             "build_indexed_dataset.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    ckpt, profile_file = imported["ckpt"], os.path.join(imported["ckpt"], imported["record"]["tokenizer_profile"])
    with open(profile_file) as f:
        profile = TokenizerProfile.from_dict(json.load(f))
    images = [encode_image(make_image(seed), "PNG") for seed in range(3)]
    with open(tmp_path / "table.jsonl", "w") as f:
        for i, data in enumerate(images):
            (tmp_path / f"{i}.png").write_bytes(data)
            f.write(json.dumps({"image": f"{i}.png", "caption": f"t{7 + i} t8 t9"}) + "\n")
    argv = ["--input", str(tmp_path / "table.jsonl"), "--output-prefix", str(tmp_path / "ds"),
            "--text-tokenizer", imported["hf"], "--image-tokenizer", os.path.join(ckpt, "vq_model"),
            "--image-size", "16", "--max-seq-length", "30", "--tokenizer-profile", profile_file]
    assert tool.main(argv) == 0
    manifest = json.loads((tmp_path / "ds.json").read_text())
    assert manifest["tokenizer_profile"] == json.loads(json.dumps(profile.to_dict()))
    vq = ImageTokenizer(os.path.join(ckpt, "vq_model"), 16)
    dataset = IndexedDataset(str(tmp_path / "ds"))
    for i, data in enumerate(images):
        codes = vq.encode(vq.preprocess(load_rgb(data))[None])[0].numpy()
        table = np.asarray(profile.image_token_ids)
        expected = [1, 7 + i, 8, 9, 3] + table[codes].tolist() + [4, 2]
        assert dataset[i].tolist() == expected
    assert tool.main(argv[:-6] + ["--image-size", "32", "--max-seq-length", "80", "--tokenizer-profile",
                                  profile_file, "--overwrite"]) == 2  # the profile is for 16 px
