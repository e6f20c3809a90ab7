"""One dataset built by many processes (data/build_ranks.py): torchrun ranks, a killed rank,
a double submit. Every result must equal the one-process build byte for byte."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from arra_megatron.data.build_ranks import BuildRank, Claims, unclaimed
from arra_megatron.runtime.launch import free_port
from tests.data.conftest import build_argv as _argv
from tests.data.conftest import built_files as _files
from tests.data.conftest import build_tool as tool

ROOT = Path(__file__).resolve().parents[2]
TOOL = str(ROOT / "tools" / "build_indexed_dataset.py")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def _torchrun(nproc: int, argv: list, **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--max-restarts=0",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", TOOL, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(**env), cwd=ROOT)


def _manifest(prefix) -> dict:
    return json.loads(Path(f"{prefix}.json").read_text())


def _built_parts(log: str) -> list:
    return sorted(int(i) for i in re.findall(r"rank \d+: part (\d+) done", log))


# ----------------------------------------------------------------------------- unit: ranks and claims
@pytest.mark.parametrize("env, expected", [
    ({}, (0, 1, 0, "single process")),
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "29500"},
     (3, 8, 1, "torchrun")),
    ({"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "4",
      "SLURM_ARRAY_JOB_ID": "77"}, (2, 4, 0, "SLURM array")),
    ({"SLURM_ARRAY_TASK_ID": "30", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "2",
      "SLURM_ARRAY_TASK_COUNT": "16"}, (15, 16, 0, "SLURM array")),  # --array=0-30:2
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "5",
      "SLURM_JOB_ID": "9"}, (5, 16, 5, "srun")),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}, (0, 1, 0, "single process")),  # the batch script itself
])
def test_rank_from_the_launchers_environment(env, expected):
    rank = BuildRank.from_env(env)
    assert (rank.rank, rank.world, rank.local_rank, rank.launcher) == expected


def test_a_rank_visits_its_share_first_then_helps_the_others():
    assert BuildRank(1, 3).visiting_order(list(range(7))) == [1, 4, 0, 2, 3, 5, 6]
    with pytest.raises(ValueError, match="outside a world of 2"):
        BuildRank(2, 2)


def test_claims_are_exclusive_and_dead_or_silent_holders_are_replaced(tmp_path):
    a, b = Claims(tmp_path, BuildRank(0, 2, job="j")), Claims(tmp_path, BuildRank(1, 2, job="j"), stale_after=60)
    try:
        assert a.try_claim("part-00000") and not b.try_claim("part-00000")
        assert b.holder("part-00000")["rank"] == 0
        assert list(unclaimed(b, ["part-00000", "part-00001", "part-00002"], lambda n: n == "part-00002")) == \
            ["part-00001"]
        a.release("part-00000")
        assert b.try_claim("part-00000")
        # a holder on this host whose process is gone: taken over at once
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
        (tmp_path / "part-00003.claim").write_text(json.dumps({**a.owner, "pid": int(dead)}))
        assert b.try_claim("part-00003")
        # a live holder elsewhere that stopped touching its claim: taken over after stale_after
        (tmp_path / "part-00004.claim").write_text(json.dumps({**a.owner, "host": "another-node"}))
        assert not b.try_claim("part-00004")
        old = time.time() - 120
        os.utime(tmp_path / "part-00004.claim", (old, old))
        assert b.try_claim("part-00004")
        assert b.holder("part-00004")["pid"] == os.getpid() and b.holder("part-00004")["rank"] == 1
        # a's claim taken over by b (a stopped its heartbeat): a's release leaves b's claim alone
        assert a.try_claim("part-00005")
        os.utime(tmp_path / "part-00005.claim", (old, old))
        assert b.try_claim("part-00005")
        a.release("part-00005")
        assert b.holder("part-00005")["rank"] == 1
    finally:
        a.close()
        b.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_overwrite_with_many_processes_is_refused(tmp_path, monkeypatch, tar_inputs, sp_model, janus_vq_dir, caplog):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert tool.main(_argv(tar_inputs, tmp_path / "x", sp_model, janus_vq_dir, "--overwrite")) == 2
    assert "--overwrite with 2 processes (torchrun)" in caplog.text
    assert not (tmp_path / "x.parts").exists()


# ----------------------------------------------------------------------------- torchrun and double submits
@pytest.mark.parametrize("nproc", [2, 4])
def test_torchrun_build_equals_the_one_process_build(tmp_path, nproc, tar_build, tar_inputs, sp_model, janus_vq_dir):
    prefix = tmp_path / "laion"
    proc = _torchrun(nproc, _argv(tar_inputs, prefix, sp_model, janus_vq_dir))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _files(prefix) == _files(tar_build)
    assert _manifest(prefix) == _manifest(tar_build)
    assert not Path(f"{prefix}.parts").exists()
    assert _built_parts(proc.stderr) == [0, 1, 2, 3, 4]  # each part built once


def test_a_killed_rank_is_finished_by_a_rerun(tmp_path, tar_build, tar_inputs, sp_model, janus_vq_dir):
    prefix = tmp_path / "laion"
    argv = _argv(tar_inputs, prefix, sp_model, janus_vq_dir)
    proc = _torchrun(2, argv, ARRA_BUILD_FAIL_AFTER="*:1")  # each rank dies after its first part
    assert proc.returncode != 0
    assert not Path(f"{prefix}.json").exists()
    before = sorted(int(p.name[5:10]) for p in Path(f"{prefix}.parts").glob("part-*.json"))
    assert 1 <= len(before) < 5
    rerun = _torchrun(2, argv)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert f"({len(before)} finished earlier)" in rerun.stderr
    again = _built_parts(rerun.stderr)
    assert sorted(again + before) == [0, 1, 2, 3, 4]  # nothing finished was built again
    assert _files(prefix) == _files(tar_build) and _manifest(prefix) == _manifest(tar_build)


def test_double_submit_joins_or_is_refused_and_the_dataset_is_intact(tmp_path, tar_build, tar_inputs, sp_model,
                                                                     janus_vq_dir):
    prefix = tmp_path / "laion"
    cmd = [sys.executable, TOOL, *_argv(tar_inputs, prefix, sp_model, janus_vq_dir)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for returncode, log in results:
        assert "Traceback" not in log, log[-3000:]
        assert returncode == 0 or (returncode == 2 and "holds a finished dataset" in log), log[-3000:]
    assert _files(prefix) == _files(tar_build) and _manifest(prefix) == _manifest(tar_build)
    assert not Path(f"{prefix}.parts").exists()
