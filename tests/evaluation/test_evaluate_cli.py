"""tools/evaluate.py end to end: real InceptionV3 architecture (random weights from a local file),
reference statistics files, bad images, CLIP-Score prompt matching, exit codes."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from arra_megatron.evaluation.feature_nets import load_feature_net
from tests.evaluation.conftest import load_tool, write_images

evaluate_tool = load_tool("evaluate")


def _run(capsys, *argv) -> tuple:
    rc = evaluate_tool.main([*map(str, argv), "--no-progress", "--batch-size", "4"])
    return rc, capsys.readouterr().out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    write_images(root / "a", [0, 1, 2, 3, 4, 5])
    (root / "a" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (root / "a" / "empty.jpg").write_bytes(b"")
    write_images(root / "b", [10, 11, 12, 13, 14, 15])
    return root


def test_self_fid_is_zero_through_a_stats_file_and_other_sets_are_not(folders, inception_weights, capsys):
    """--save-ref-stats from folder a, then a against those statistics: FID ~ 0; folder b: FID > 0."""
    stats = folders / "a_stats.npz"
    rc, _ = _run(capsys, "--ref", folders / "a", "--save-ref-stats", stats, "--inception-weights", inception_weights,
                 "--inception-features", "192")
    assert rc == 0
    with np.load(stats) as data:
        assert data["mu"].shape == (192,) and data["sigma"].shape == (192, 192) and int(data["num_images"]) == 6
        assert json.loads(str(data["feature_net"]))["name"] == "inception-v3-compat:192"

    rc, out = _run(capsys, "--generated", folders / "a", "--ref", stats, "--metrics", "fid", "is", "--is-splits", "2",
                   "--inception-weights", inception_weights, "--inception-features", "192")
    assert rc == 0
    report = json.loads((folders / "a" / "evaluation.json").read_text())
    assert abs(report["metrics"]["fid"]) < 1e-3
    assert report["generated"]["images"] == 8 and report["generated"]["used"] == 6
    assert report["generated"]["skipped"] == {"image_undecodable": 1, "image_empty": 1}
    assert sorted(report["generated"]["skipped_files"]) == ["image_empty", "image_undecodable"]
    assert report["reference"]["kind"] == "statistics" and report["reference"]["images"] == 6
    assert report["settings"]["inception"]["weights"] == str(inception_weights.resolve())
    # IS from the logits of the same pass (its arithmetic is checked on known logits in test_metrics).
    assert 1.0 < report["metrics"]["inception_score"] < 1000 and report["metrics"]["inception_score_std"] >= 0
    assert "fid" in out and "6 used of 8 (2 skipped)" in out

    rc, _ = _run(capsys, "--generated", folders / "b", "--ref", stats, "--metrics", "fid",
                 "--inception-weights", inception_weights, "--inception-features", "192", "--output",
                 folders / "b.json")
    assert rc == 0
    other = json.loads((folders / "b.json").read_text())["metrics"]["fid"]
    assert other > 1000 * max(abs(report["metrics"]["fid"]), 1e-9)


def test_folder_reference_and_torchvision_feature_net(folders, tmp_path, capsys):
    """--fid-feature-net torchvision:resnet18:PATH: features are the pooled input of fc; FID(a, a) ~ 0."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    torch.save(model.state_dict(), tmp_path / "resnet18.pth")
    net = load_feature_net(f"torchvision:resnet18:{tmp_path / 'resnet18.pth'}")
    images = torch.randint(0, 256, (2, 3, 40, 50), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    model.fc = torch.nn.Identity()
    x = F.interpolate(images.float() / 255, size=(224, 224), mode="bilinear", antialias=True)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(net(images)["features"], model.eval()(x), rtol=1e-5, atol=1e-5)

    small = write_images(tmp_path / "c", [30, 31, 32], prompts=False)[0].parent
    rc, out = _run(capsys, "--generated", small, "--ref", small, "--metrics", "fid",
                   "--fid-feature-net", f"torchvision:resnet18:{tmp_path / 'resnet18.pth'}",
                   "--output", tmp_path / "r.json")
    assert rc == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert abs(report["metrics"]["fid"]) < 1e-3
    assert report["settings"]["fid_feature_net"]["name"] == "torchvision:resnet18"
    assert report["reference"]["kind"] == "folder" and report["reference"]["used"] == 3


def test_clip_score_matches_prompts_by_file_name(folders, clip_dir, tmp_path, capsys):
    """samples.jsonl in another order than the files, plus a corrupt image: each image meets its own prompt."""
    import open_clip
    from PIL import Image

    gen = tmp_path / "gen"
    files = write_images(gen, [20, 21, 22, 23, 24])
    lines = (gen / "samples.jsonl").read_text().splitlines()
    random.Random(0).shuffle(lines)
    (gen / "000000_broken.png").write_bytes(b"garbage")
    lines.append(json.dumps({"file": "000000_broken.png", "prompt": "whatever"}))
    (gen / "samples.jsonl").write_text("\n".join(lines) + "\n")
    rc, _ = _run(capsys, "--generated", gen, "--metrics", "clip-score", "--clip-model", clip_dir)
    assert rc == 0
    report = json.loads((gen / "evaluation.json").read_text())

    prompts = {json.loads(line)["file"]: json.loads(line)["prompt"] for line in lines}
    model, transform = open_clip.create_model_from_pretrained(f"local-dir:{clip_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{clip_dir}")
    with torch.no_grad():
        cos = F.cosine_similarity(model.eval().encode_image(torch.stack([transform(Image.open(f)) for f in files])),
                                  model.encode_text(tokenizer([prompts[f.name] for f in files])))
    assert report["metrics"]["clip_cosine"] == pytest.approx(float(cos.mean()), abs=1e-5)
    assert report["metrics"]["clip_score"] == pytest.approx(max(100 * float(cos.mean()), 0.0), abs=1e-3)
    assert report["generated"]["skipped"] == {"image_undecodable": 1}


def test_ms_ssim_of_a_set_of_copies_is_one(tmp_path, capsys):
    same = tmp_path / "same"
    files = write_images(same, [7, 8, 9], prompts=False)
    for f in files[1:]:
        f.write_bytes(files[0].read_bytes())
    rc, _ = _run(capsys, "--generated", same, "--metrics", "ms-ssim", "--ms-ssim-pairs", "5")
    assert rc == 0
    assert json.loads((same / "evaluation.json").read_text())["metrics"] == {"ms_ssim": pytest.approx(1.0, abs=1e-6),
                                                                             "ms_ssim_pairs": 5}
    varied = tmp_path / "varied"
    write_images(varied, [7, 8, 9], prompts=False)
    rc, out = _run(capsys, "--generated", varied, "--metrics", "ms-ssim", "--ms-ssim-pairs", "5")
    value = json.loads((varied / "evaluation.json").read_text())["metrics"]["ms_ssim"]
    assert rc == 0 and 0 < value < 0.9 and re.search(rf"^ms_ssim +{value:.4f}$", out, re.M)


def _bad_cases(root, weights):
    """(argv, message the log must contain) for every refused input."""
    import importlib.util

    xrv_missing = importlib.util.find_spec("torchxrayvision") is None
    missing = root / "nowhere" / "weights.pth"
    gen = ["--generated", root / "a"]
    cases = {
        "missing_weights_file": (gen + ["--ref", root / "a", "--inception-weights", missing],
                                 f"--inception-weights {missing}: weights file not found"),
        "corrupt_weights": (gen + ["--ref", root / "a", "--inception-weights", root / "a" / "corrupt.png"],
                            "not torch-fidelity's InceptionV3 weights"),
        "weights_of_another_net": (gen + ["--ref", root / "a", "--metrics", "fid", "--fid-feature-net",
                                          f"torchvision:resnet18:{weights}"], "weights do not fit resnet18"),
        "no_weights_flag": (gen + ["--ref", root / "a"], "--inception-weights is required"),
        "empty_folder": (["--generated", root / "empty", "--ref", root / "a", "--inception-weights", weights],
                         "no image files"),
        "only_bad_images": (["--generated", root / "bad", "--metrics", "ms-ssim"],
                            "none of the 2 image files could be decoded"),
        "fid_without_ref": (gen + ["--inception-weights", weights], "--metrics fid needs --ref"),
        "bad_feature_net": (gen + ["--ref", root / "a", "--metrics", "fid", "--fid-feature-net", "vgg"],
                            "--fid-feature-net 'vgg'"),
        "clip_without_model": (gen + ["--metrics", "clip-score"], "needs --clip-model"),
        "bad_prompts": (["--generated", root / "badprompts", "--metrics", "clip-score", "--clip-model", root / "clip"],
                        "samples.jsonl:3: expected a JSON object with 'file' and 'prompt'"),
        "stats_without_mu": (gen + ["--ref", root / "nomu.npz", "--inception-weights", weights, "--metrics", "fid"],
                             "needs arrays 'mu' and 'sigma'"),
        "no_generated": (["--ref", root / "a"], "--generated is required"),
        "stats_from_stats": (["--ref", root / "nomu.npz", "--save-ref-stats", root / "x.npz"],
                             "--save-ref-stats needs --ref to be a folder"),
    }
    if xrv_missing:
        cases["xrv_not_installed"] = (gen + ["--ref", root / "a", "--metrics", "fid", "--fid-feature-net",
                                             f"xrv:{weights}"], "needs the torchxrayvision package")
    return cases


def test_bad_inputs_exit_2_with_a_message(folders, inception_weights, clip_dir, caplog, capsys):
    (folders / "empty").mkdir(exist_ok=True)
    (folders / "bad").mkdir(exist_ok=True)
    (folders / "bad" / "x.png").write_bytes(b"nope")
    (folders / "bad" / "y.jpg").write_bytes(b"")
    (folders / "clip").mkdir(exist_ok=True)
    for f in clip_dir.iterdir():
        (folders / "clip" / f.name).write_bytes(f.read_bytes())
    write_images(folders / "badprompts", [1, 2])
    with open(folders / "badprompts" / "samples.jsonl", "a") as f:
        f.write("[1, 2]\n")
    np.savez(folders / "nomu.npz", sigma=np.eye(3))
    for name, (argv, message) in _bad_cases(folders, inception_weights).items():
        caplog.clear()
        rc, _ = _run(capsys, *argv)
        assert (name, rc) == (name, 2)
        assert message in caplog.text, (name, caplog.text)


def test_torchrun_processes_share_the_images_and_agree_with_one(folders, inception_weights, clip_dir, tmp_path,
                                                                capsys):
    """2 gloo processes, each scoring every other image (a corrupt file included): the same
    FID (moments combined across processes), IS (logits gathered in file order), CLIP-Score
    (torchmetrics' own sync) and skip counts as one process."""
    import os
    import subprocess
    import sys

    from arra_megatron.runtime.launch import free_port
    from tests.evaluation.conftest import TOOLS

    gen = tmp_path / "gen"
    write_images(gen, list(range(20, 27)))  # 7 images: an odd count, so the processes' shares differ
    (gen / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with open(gen / "samples.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"file": "corrupt.png", "prompt": "never read"}) + "\n")
    argv = ["--generated", str(gen), "--ref", str(folders / "b"), "--metrics", "fid", "is", "clip-score",
            "--is-splits", "2", "--inception-weights", str(inception_weights), "--inception-features", "192",
            "--clip-model", str(clip_dir), "--no-progress", "--batch-size", "2", "--device", "cpu"]
    rc, _ = _run(capsys, *argv, "--output", tmp_path / "one.json")
    assert rc == 0
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--max-restarts=0",
                           "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(TOOLS / "evaluate.py"),
                           *argv, "--output", str(tmp_path / "two.json")], capture_output=True, text=True,
                          timeout=300, env={**env, "OMP_NUM_THREADS": "1"}, cwd=TOOLS.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    # Other batch groupings change the networks' outputs in the last bits; 8 images in 192-d make
    # the covariance singular, which amplifies that in sqrtm: 1e-5, far below any real difference.
    assert two["metrics"]["fid"] == pytest.approx(one["metrics"]["fid"], rel=1e-5)
    assert two["metrics"]["inception_score"] == pytest.approx(one["metrics"]["inception_score"], rel=1e-6)
    assert two["metrics"]["clip_score"] == pytest.approx(one["metrics"]["clip_score"], rel=1e-6)
    assert two["generated"] == one["generated"] and two["reference"] == one["reference"]
