"""tools/train_vq.py: learns real images, agrees with the dataset builder and ImageTokenizer, resumes exactly."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset
from PIL import Image

from arra_megatron.data.readers import ClassFolderSource
from arra_megatron.tokenization import vq_training
from arra_megatron.tokenization.image import ImageTokenizer
from arra_megatron.tokenization.profile import TokenizerProfile
from arra_megatron.tokenization.vq_training import ImageRefDataset, VQTrainConfig, open_images, scan_images, vq_forward

_ROOT = Path(__file__).resolve().parents[2]


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, _ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_tool = _load_tool("train_vq")
build_tool = _load_tool("build_indexed_dataset")

IMAGE_SIZE = 16  # 8x8 digits upscaled by the preprocessing; 4x down-sampling -> 4x4 = 16 tokens
MODEL_FLAGS = ["--image-size", str(IMAGE_SIZE), "--channel-multiplier", "1", "1", "2", "--base-channels", "32",
               "--num-res-blocks", "1", "--latent-channels", "32", "--codebook-size", "64", "--codebook-dim", "8"]


def _write_digits(root: Path, per_class: int | None = None) -> list:
    """scikit-learn's 8x8 handwritten digits as ROOT/CLASS/NNNN.png (real images shipped with the package)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    written = []
    counts = {}
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        if per_class is not None and counts.get(label, 0) >= per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        path = root / str(label) / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype(np.uint8)).save(path)
        written.append(path)
    return written


def _train(input_dir: Path, output: Path, *extra: str) -> int:
    return train_tool.main(["--input", str(input_dir), "--output", str(output), *MODEL_FLAGS, *extra])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine, 2 spinning OpenMP threads made these tests ~6x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    _write_digits(root)
    (root / "3" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # skipped and counted
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits) -> Path:
    out = tmp_path_factory.mktemp("vq")
    assert _train(digits, out, "--batch-size", "32", "--iters", "100", "--lr", "2e-3", "--val-fraction", "0.1",
                  "--restart-interval", "50", "--log-interval", "50") == 0
    return out


def test_training_lowers_reconstruction_error_on_unseen_images(trained):
    report = json.loads((trained / "train_vq.json").read_text())
    assert report["finished"] and report["iterations"] == 100
    assert report["images"] == {**report["images"], "train": 1617, "val": 180,
                                "skipped": {"image_undecodable": 1}}
    initial, final = report["initial_val"], report["val"]
    # measured (2-core CPU, torch 2.14): val MSE 0.664 -> 0.206, PSNR 7.8 -> 12.9 dB, usage 0.70, perplexity 37
    assert final["mse"] < 0.4 * initial["mse"], (initial, final)
    assert final["psnr"] > initial["psnr"] + 4
    assert final["usage"] > 0.5 and final["perplexity"] > 16
    assert json.loads((trained / "config.json").read_text())["architectures"] == ["JanusVQVAE"]
    assert not (trained / "train_state.pt").exists()


def test_image_tokenizer_encode_decode_is_the_training_forward(trained, digits):
    """What the builder encodes and generate.py decodes is what the model was trained on."""
    from transformers import JanusVQVAE

    images = scan_images(open_images(VQTrainConfig(input=str(digits), output="", image_size=IMAGE_SIZE)), IMAGE_SIZE)
    pixels = torch.stack([ImageRefDataset(images, IMAGE_SIZE)[i] for i in range(0, 1797, 97)])
    model = JanusVQVAE.from_pretrained(str(trained)).eval()
    with torch.no_grad():
        training = vq_forward(model, pixels)
    tokenizer = ImageTokenizer(trained, IMAGE_SIZE)
    codes = tokenizer.encode(pixels)
    assert torch.equal(codes, training.codes)
    torch.testing.assert_close(tokenizer.decode(codes), training.reconstruction, rtol=0, atol=1e-5)
    assert len(set(codes.flatten().tolist())) > 10


def test_builder_dataset_holds_the_training_quantiser_codes(trained, tmp_path):
    root = tmp_path / "digits"
    _write_digits(root, per_class=4)
    prefix = tmp_path / "c2i"
    assert build_tool.main(["--input", str(root), "--output-prefix", str(prefix), "--image-tokenizer", str(trained),
                            "--image-size", str(IMAGE_SIZE), "--max-seq-length", "24"]) == 0
    source = open_images(VQTrainConfig(input=str(root), output="", image_size=IMAGE_SIZE))
    assert isinstance(source, ClassFolderSource)
    images = scan_images(source, IMAGE_SIZE)  # no cache: each image decoded from its file, as the builder does
    pixels = torch.stack([ImageRefDataset(images, IMAGE_SIZE)[i] for i in range(len(images.refs))])
    from transformers import JanusVQVAE

    with torch.no_grad():
        expected = vq_forward(JanusVQVAE.from_pretrained(str(trained)), pixels).codes.tolist()
    profile = TokenizerProfile.from_dict(json.loads(Path(f"{prefix}.json").read_text())["tokenizer_profile"])
    lo, _ = profile.image_token_range
    dataset = IndexedDataset(str(prefix), mmap=True)
    assert len(dataset) == 40
    for doc, codes in zip(dataset, expected):
        doc = doc.tolist()
        boi, eoi = doc.index(profile.special.boi), doc.index(profile.special.eoi)
        assert [t - lo for t in doc[boi + 1:eoi]] == codes


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small_digits")
    _write_digits(root, per_class=10)
    return root


RESUME_FLAGS = ["--batch-size", "16", "--iters", "24", "--save-interval", "8", "--restart-interval", "5",
                "--lr", "2e-3", "--lr-schedule", "cosine", "--log-interval", "10"]


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def test_interrupted_runs_resume_bit_identical(small_digits, tmp_path, monkeypatch):
    """Same final weights (bit for bit, CPU, same threads) after --exit-after or a crash, resumed by rerunning.

    The data order, the lr schedule and the dead-code restarts depend on the step only (plus the saved
    restart generator and usage counts), so nothing else needs restoring; neither do decoding workers
    nor the image cache matter."""
    assert _train(small_digits, tmp_path / "straight", *RESUME_FLAGS) == 0
    expected = _weights(tmp_path / "straight")

    assert _train(small_digits, tmp_path / "stopped", *RESUME_FLAGS, "--exit-after", "13") == 0
    assert (tmp_path / "stopped" / "train_state.pt").exists() and not (tmp_path / "stopped" / "train_vq.json").exists()
    # decoding each batch again in 2 worker processes instead of the in-memory cache: the same pixels and order
    assert _train(small_digits, tmp_path / "stopped", *RESUME_FLAGS, "--num-workers", "2", "--cache-mb", "0") == 0

    calls = {"n": 0}
    real_forward = vq_training.vq_forward

    def crash_at_step_20(*args, **kwargs):  # a kill mid-interval: the steps after the state at 16 are lost
        calls["n"] += 1
        if calls["n"] == 20 + 1:  # + the initial validation batch (5 images)
            raise KeyboardInterrupt
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(vq_training, "vq_forward", crash_at_step_20)
    with pytest.raises(KeyboardInterrupt):
        _train(small_digits, tmp_path / "crashed", *RESUME_FLAGS)
    monkeypatch.undo()
    state = torch.load(tmp_path / "crashed" / "train_state.pt", weights_only=True)
    assert state["step"] == 16
    assert _train(small_digits, tmp_path / "crashed", *RESUME_FLAGS) == 0

    for out in (tmp_path / "stopped", tmp_path / "crashed"):
        weights = _weights(out)
        assert weights.keys() == expected.keys()
        assert all(torch.equal(weights[k], expected[k]) for k in expected), out
    report = json.loads((tmp_path / "stopped" / "train_vq.json").read_text())
    assert report["restarted_codes"] > 0  # the restart RNG and usage counts crossed the resume


def test_resume_with_other_settings_is_refused(small_digits, tmp_path):
    assert _train(small_digits, tmp_path / "out", *RESUME_FLAGS, "--exit-after", "10") == 0
    assert _train(small_digits, tmp_path / "out", *RESUME_FLAGS, "--lr", "1e-3") == 2


@pytest.mark.parametrize("case", ["missing", "empty", "no_images", "image_size", "base_channels", "finished"])
def test_bad_input_exits_2(case, small_digits, tmp_path, caplog):
    flags = ["--batch-size", "4", "--iters", "2"]
    source, expected = small_digits, None
    if case == "missing":
        source, expected = tmp_path / "nope", "no such file or directory"
    elif case == "empty":
        source, expected = tmp_path / "empty", "no usable images"
        source.mkdir()
    elif case == "no_images":
        source, expected = tmp_path / "tree", "no usable images"
        (source / "cat").mkdir(parents=True)
        (source / "cat" / "notes.txt").write_text("not an image")
        (source / "cat" / "broken.jpg").write_bytes(b"garbage")
    elif case == "image_size":
        flags, expected = flags + ["--image-size", "18"], "multiple of the down-sampling factor 4"
    elif case == "base_channels":
        flags, expected = flags + ["--base-channels", "48"], "--base-channels 48"
    else:
        assert _train(small_digits, tmp_path / "out", *flags) == 0
        expected = "pass --overwrite"
    assert _train(source, tmp_path / "out", *flags) == 2
    assert expected in caplog.text
    if case == "finished":
        assert _train(source, tmp_path / "out", *flags, "--overwrite") == 0


def test_plain_image_directory_counts_corrupt_images(tmp_path):
    flat = tmp_path / "flat"
    for path in _write_digits(tmp_path / "tree", per_class=3):
        flat.mkdir(exist_ok=True)
        path.rename(flat / f"{path.parent.name}_{path.name}")
    (flat / "truncated.png").write_bytes((flat / "0_0000.png").read_bytes()[:30])
    (flat / "empty.jpg").write_bytes(b"")
    (flat / "readme.txt").write_text("not an image")
    assert _train(flat, tmp_path / "out", "--batch-size", "8", "--iters", "2", "--val-fraction", "0.2") == 0
    report = json.loads((tmp_path / "out" / "train_vq.json").read_text())
    assert report["images"]["input"]["kind"] == "images"
    assert report["images"]["skipped"] == {"image_empty": 1, "image_undecodable": 1}
    assert report["images"]["train"] + report["images"]["val"] == 30 and report["images"]["val"] == 6
