"""tools/generate.py end to end: a model trained by the training loop -> PNGs decoded by the dataset's
VQ model, grid.png and samples.jsonl; the same images from the checkpoint and from its export."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.inference.fixtures import IMAGE_SIZE, ROOT

SCRIPT = str(ROOT / "tools" / "generate.py")


def generate(*flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ARRA_CPU_MODE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, SCRIPT, *flags], capture_output=True, text=True, timeout=300,
                          env=env, cwd=ROOT)


def index(out_dir) -> list:
    return [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def prompts_file(model):
    path = model.root / "prompts.txt"
    path.write_text("a red cat\n\nthe dog over a small blue house\n")
    return path


@pytest.fixture(scope="module")
def from_checkpoint(model, prompts_file):
    out = model.root / "samples_ckpt"
    proc = generate("--load", str(model.checkpoint), "--prompts", str(prompts_file), "--num-samples", "2",
                    "--cfg-scale", "2", "--top-k", "16", "--seed", "7", "--micro-batch-size", "3",
                    "--out-dir", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, proc


def test_pngs_grid_and_index(from_checkpoint, model):
    out, proc = from_checkpoint
    rows = index(out)
    assert [r["file"] for r in rows] == [f"{i:06d}.png" for i in range(4)]
    assert [r["prompt"] for r in rows] == ["a red cat"] * 2 + ["the dog over a small blue house"] * 2
    assert [r["seed"] for r in rows] == [7, 8, 9, 10]
    for r in rows:
        with Image.open(out / r["file"]) as image:
            assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB"
            pixels = np.asarray(image)
        assert pixels.std() > 0  # a decoded image, not a constant fill
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (4 * (IMAGE_SIZE + 2) + 2, IMAGE_SIZE + 4)  # make_grid, 4 images in one row, padding 2
    assert "sampling" in proc.stderr  # the tqdm bar


def test_pngs_are_the_vq_decoding_of_the_codes(from_checkpoint, model):
    import torch

    from arra_megatron.inference.output import to_unit_range
    from arra_megatron.tokenization.image import ImageTokenizer

    out, _ = from_checkpoint
    rows = index(out)
    vq = ImageTokenizer(model.vq, IMAGE_SIZE)
    pixels = to_unit_range(vq.decode(torch.tensor([r["codes"] for r in rows])))
    expected = (pixels * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # save_image's rounding
    for r, want in zip(rows, expected):
        with Image.open(out / r["file"]) as image:
            assert np.array_equal(np.asarray(image), want)


def test_hf_export_gives_the_same_images(from_checkpoint, model, hf_dir, prompts_file):
    out = model.root / "samples_hf"
    proc = generate("--hf", str(hf_dir), "--data-path", str(model.prefix), "--prompts", str(prompts_file),
                    "--num-samples", "2", "--cfg-scale", "2", "--top-k", "16", "--seed", "7", "--out-dir", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert index(out) == index(from_checkpoint[0])


def test_bad_flags_exit_2(model, tmp_path, capsys):
    from arra_megatron.inference.cli import main

    # A text-to-image model has no class tokens: refused before any model is loaded.
    assert main(["--load", str(model.checkpoint), "--class-ids", "0", "--out-dir", str(tmp_path / "c")]) == 2
    assert "--prompts" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--load", str(model.checkpoint), "--class-ids", "0", "--top-p", "0", "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "--top-p" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_unconditional_samples_the_null_condition(model, hf_dir):
    """--unconditional draws from [BOS] [NULL] [BOI], the prompt condition dropout trains."""
    import torch

    from arra_megatron.inference.conditions import dataset_profile
    from arra_megatron.inference.hf_decoder import HFDecoder, load_hf_model
    from arra_megatron.inference.sampling import SamplingConfig, null_prompt, sample_image_tokens

    out = model.root / "samples_uncond"
    proc = generate("--hf", str(hf_dir), "--data-path", str(model.prefix), "--unconditional", "--num-samples", "3",
                    "--top-k", "16", "--seed", "11", "--out-dir", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = index(out)
    assert [(r["unconditional"], r["seed"]) for r in rows] == [(True, 11), (True, 12), (True, 13)]
    profile, _ = dataset_profile(str(model.prefix))
    decoder = HFDecoder(load_hf_model(str(hf_dir)), True)
    codes = sample_image_tokens(decoder, profile, [null_prompt(profile)] * 3, [11, 12, 13], SamplingConfig(top_k=16))
    assert torch.equal(torch.as_tensor(codes), torch.tensor([r["codes"] for r in rows]))


def test_unconditional_refuses_guidance(model, tmp_path):
    from arra_megatron.inference.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--load", str(model.checkpoint), "--unconditional", "--cfg-scale", "2", "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 2


# ----------------------------------------------------------------------------- data parallelism and resume
DP_FLAGS = ("--num-samples", "3", "--cfg-scale", "2", "--top-k", "16", "--seed", "3", "--micro-batch-size", "2")


def torchrun_generate(nproc: int, *flags: str, **env) -> subprocess.CompletedProcess:
    from arra_megatron.runtime.launch import free_port

    run_env = {**os.environ, "ARRA_CPU_MODE": "1", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                           "--max-restarts=0", "--master-addr=127.0.0.1", f"--master-port={free_port()}", SCRIPT,
                           *flags], capture_output=True, text=True, timeout=300, env=run_env, cwd=ROOT)


def _outputs(out_dir) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir())}


@pytest.fixture(scope="module")
def samples_dp1(model, prompts_file):
    out = model.root / "samples_dp1"
    proc = generate("--load", str(model.checkpoint), "--prompts", str(prompts_file), *DP_FLAGS, "--out-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-5000:]
    return out


@pytest.mark.parametrize("nproc, layout", [(2, []), (4, ["--tensor-model-parallel-size", "2"])],
                         ids=["DP2", "TP2xDP2"])
def test_data_parallel_sampling_gives_the_same_images(samples_dp1, model, prompts_file, tmp_path, nproc, layout):
    out = tmp_path / "samples"
    proc = torchrun_generate(nproc, "--load", str(model.checkpoint), "--prompts", str(prompts_file), *DP_FLAGS,
                             *layout, "--out-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert [r["file"] for r in index(out)] == [f"{i:06d}.png" for i in range(6)]
    assert _outputs(out) == _outputs(samples_dp1)  # PNGs, grid.png and samples.jsonl, byte for byte


def test_interrupted_sampling_resumes_at_another_world_size(samples_dp1, model, prompts_file, tmp_path):
    out = tmp_path / "samples"
    flags = ("--load", str(model.checkpoint), "--prompts", str(prompts_file), *DP_FLAGS, "--out-dir", str(out))
    proc = torchrun_generate(2, *flags, ARRA_GENERATE_FAIL_AFTER="*:1")  # each replica dies after one batch
    assert proc.returncode != 0
    from arra_megatron.inference.output import recorded

    written = len(recorded(out))  # 2 or 4: the first replica to die stops the other
    assert not (out / "samples.jsonl").exists() and written in (2, 4)
    changed = generate(*flags[:-2], "--seed", "4", "--out-dir", str(out))
    assert changed.returncode == 2 and "unfinished run of another request" in changed.stderr
    assert "(changed: ['seeds'])" in changed.stderr
    resumed = generate(*flags)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert f"{written} of 6 images written earlier" in resumed.stderr
    assert _outputs(out) == _outputs(samples_dp1)


def test_checkpoint_of_the_old_trainer_is_refused_with_the_conversion_command(tmp_path, capsys):
    from arra_megatron.inference.cli import main

    legacy = ROOT / "tests" / "training" / "data" / "legacy_trainer" / "ckpt"
    assert main(["--load", str(legacy), "--class-ids", "0", "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "tools/convert_checkpoint.py legacy" in err and not (tmp_path / "out").exists()
