"""tools/compare_runs.py: --log-json files of the training loop (resumed runs, cut lines, validation and
test records), table, PNG."""

from __future__ import annotations

import json
import math
import re

import pytest

from arra_megatron.evaluation.runs import read_metrics_log, smooth, summarize
from tests.evaluation.conftest import load_tool

compare_tool = load_tool("compare_runs")


def _record(it: int, lm: float, gva: bool) -> dict:
    """A training record as megatron_loop.JsonLog writes it."""
    record = {"iteration": it, "consumed_samples": 16 * it, "lm_loss": lm, "skipped": 0, "grad_norm": 1.0,
              "lr": 1e-4, "loss_scale": 1.0}
    if gva:
        record.update(gva_loss=0.5 / it, gva_cos=1 - 0.5 / it, gva_dropped_samples=0.0)
    return record


def _evaluation(it: int, lm: float, gva: bool, split: str = "valid") -> dict:
    """An evaluation record (Megatron-LM's evaluation keys, the split, the iteration it followed)."""
    record = {"iteration": it, "split": split, "lm_loss": lm}
    if gva:
        record.update(gva_loss=0.25, gva_cos=0.75)
    return record


def _write_log(path, scale: float, gva: bool, resume: bool) -> None:
    """50 iterations of lm = scale * (1 + 4 exp(-it / 10)); with ``resume``, a crash after iteration 30
    and a restart from the checkpoint at 20 that logs 21..50 again (those values are scale * 1.01 x)."""
    lines = []
    first = range(1, 31) if resume else range(1, 51)
    for it in first:
        lines.append(json.dumps(_record(it, scale * (1 + 4 * math.exp(-it / 10)), gva)))
        if it == 20:
            lines.append(json.dumps(_evaluation(it, scale * 1.5, gva)))
    if resume:
        lines.append('{"iteration": 31, "lm_lo')  # the line the crash cut
        for it in range(21, 51):
            lines.append(json.dumps(_record(it, 1.01 * scale * (1 + 4 * math.exp(-it / 10)), gva)))
    lines.append(json.dumps(_evaluation(50, scale * 1.2, gva)))
    lines.append(json.dumps(_evaluation(50, scale * 1.3, gva, split="test")))  # after training, on the test split
    path.write_text("\n".join(lines) + "\n")


def test_read_log_keeps_the_last_record_of_each_iteration(tmp_path):
    _write_log(tmp_path / "arra.jsonl", 1.0, gva=True, resume=True)
    run = read_metrics_log(tmp_path / "arra.jsonl")
    its, lm = run.train["lm_loss"]
    assert its == list(range(1, 51)) and run.bad_lines == 1 and run.name == "arra"
    assert lm[24] == pytest.approx(1.01 * (1 + 4 * math.exp(-2.5)))  # iteration 25 from the restarted run
    assert lm[9] == pytest.approx(1 + 4 * math.exp(-1))  # iteration 10 from before the crash
    assert run.valid["lm_loss"] == ([20, 50], [1.5, 1.2]) and run.valid["gva_cos"] == ([20, 50], [0.75, 0.75])
    assert run.test["lm_loss"] == ([50], [1.3])  # not mixed into the training curves
    assert run.train["lm_loss"][0][-1] == 50 and run.train["gva_cos"][1][-1] == pytest.approx(0.99)
    row = summarize(run)
    assert row["iterations"] == 50 and row["lm loss"] == pytest.approx(lm[-1])
    assert row["min lm loss"] == pytest.approx(min(lm)) and row["gva loss"] == pytest.approx(0.01)
    assert (row["eval lm loss"], row["min eval lm loss"], row["test lm loss"], row["FID"]) == (1.2, 1.2, 1.3, None)


def test_smoothing_is_debiased_ema():
    assert smooth([3.0, 3.0, 3.0], 0.9) == pytest.approx([3.0, 3.0, 3.0])
    assert smooth([1.0, 2.0], 0.0) == [1.0, 2.0]
    # second point: (0.5 * 0.5 * 1 + 0.5 * 3) / (1 - 0.25) = 1.75 / 0.75
    assert smooth([1.0, 3.0], 0.5) == pytest.approx([1.0, 1.75 / 0.75])
    with pytest.raises(ValueError, match="--smoothing"):
        smooth([1.0], 1.0)


def test_compare_runs_table_plot_and_reports(tmp_path, capsys):
    _write_log(tmp_path / "arra.jsonl", 1.0, gva=True, resume=True)
    _write_log(tmp_path / "base.jsonl", 1.1, gva=False, resume=False)
    (tmp_path / "arra_eval.json").write_text(json.dumps({"metrics": {"fid": 12.5, "clip_score": 31.25}}))
    rc = compare_tool.main([f"arra={tmp_path / 'arra.jsonl'}", f"baseline={tmp_path / 'base.jsonl'}",
                            "--eval", f"arra={tmp_path / 'arra_eval.json'}", "--plot", str(tmp_path / "curves.png"),
                            "--smoothing", "0.6", "--output", str(tmp_path / "summary.json")])
    out = capsys.readouterr().out
    assert rc == 0
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    base_final = 1.1 * (1 + 4 * math.exp(-5))
    assert re.search(r"^ +arra +baseline$", out, re.M)
    assert re.search(rf"^lm loss +{1.01 * (1 + 4 * math.exp(-5)):.4f} +{base_final:.4f}$", out, re.M)
    assert re.search(r"^gva loss +0\.0100 +-$", out, re.M)
    assert re.search(r"^eval lm loss +1\.2000 +1\.3200$", out, re.M)
    assert re.search(r"^FID +12\.5000 +-$", out, re.M) and re.search(r"^CLIP-Score +31\.2500 +-$", out, re.M)
    assert "IS" not in out.split()  # no run has it: no row
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["baseline"]["lm loss"] == pytest.approx(base_final) and summary["arra"]["FID"] == 12.5


def test_compare_runs_bad_inputs_exit_2(tmp_path, caplog):
    _write_log(tmp_path / "a.jsonl", 1.0, gva=True, resume=False)
    assert compare_tool.main([str(tmp_path / "missing.jsonl")]) == 2
    assert "metrics log not found" in caplog.text
    assert compare_tool.main([str(tmp_path / "a.jsonl"), "--eval", f"other={tmp_path / 'r.json'}"]) == 2
    assert "NAME one of ['a']" in caplog.text
    (tmp_path / "junk.jsonl").write_text("not json\n")
    assert compare_tool.main([str(tmp_path / "junk.jsonl")]) == 2
    assert "no training or evaluation records" in caplog.text
    with pytest.raises(SystemExit):
        compare_tool.main([str(tmp_path / "a.jsonl"), "--smoothing", "1.5"])
