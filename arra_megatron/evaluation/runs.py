"""Side-by-side comparison of training runs (ARRA vs baseline): summary table and loss curves.

Reads the ``--log-json`` file of the training loop (``training/megatron_loop.py::JsonLog``):
one JSON object per line, training records with ``iteration``, ``consumed_samples``,
``lm_loss``, ``gva_loss``, ``gva_cos``, ``grad_norm``, ``lr``, ... and evaluation records
with Megatron-LM's evaluation keys (``lm_loss``, ``gva_loss``, ``gva_cos``) plus ``"split":
"valid"`` or ``"test"``. A resumed run appends to the same file and logs again the
iterations after its checkpoint: the last record of an iteration wins. A line that is not
JSON (a run killed mid-write) is skipped and counted. Evaluation reports are
``tools/evaluate.py``'s JSON (their ``metrics``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

#: Report columns: (header, where, key, reduction) over the train / valid curves or the eval report.
COLUMNS: Tuple[Tuple[str, str, str, str], ...] = (
    ("iterations", "train", "iteration", "last"),
    ("lm loss", "train", "lm_loss", "last"),
    ("min lm loss", "train", "lm_loss", "min"),
    ("gva loss", "train", "gva_loss", "last"),
    ("gva cos", "train", "gva_cos", "last"),
    ("eval lm loss", "valid", "lm_loss", "last"),
    ("min eval lm loss", "valid", "lm_loss", "min"),
    ("test lm loss", "test", "lm_loss", "last"),
    ("FID", "eval", "fid", "value"),
    ("IS", "eval", "inception_score", "value"),
    ("CLIP-Score", "eval", "clip_score", "value"),
    ("MS-SSIM", "eval", "ms_ssim", "value"),
)


@dataclass
class RunLog:
    """One run's curves: ``train[key]`` / ``valid[key]`` / ``test[key]`` = (iterations, values), sorted
    by iteration."""

    name: str
    path: str
    train: Dict[str, Tuple[List[int], List[float]]] = field(default_factory=dict)
    valid: Dict[str, Tuple[List[int], List[float]]] = field(default_factory=dict)
    test: Dict[str, Tuple[List[int], List[float]]] = field(default_factory=dict)
    bad_lines: int = 0
    eval_metrics: Dict[str, Any] = field(default_factory=dict)


def _curves(records: Dict[int, Dict[str, Any]]) -> Dict[str, Tuple[List[int], List[float]]]:
    curves: Dict[str, Tuple[List[int], List[float]]] = {}
    for iteration in sorted(records):
        for key, value in records[iteration].items():
            if key != "split" and isinstance(value, (int, float)) and not isinstance(value, bool):
                its, values = curves.setdefault(key, ([], []))
                its.append(iteration)
                values.append(float(value))
    return curves


def read_metrics_log(path: str | Path, name: Optional[str] = None) -> RunLog:
    """Parse a ``--log-json`` file (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: metrics log not found (the --log-json file of pretrain_arra.py)")
    by_split: Dict[Optional[str], Dict[int, Dict[str, Any]]] = {None: {}, "valid": {}, "test": {}}
    bad = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                iteration = int(record["iteration"])
                records = by_split[record.get("split")]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                bad += 1
                continue
            records[iteration] = record
    if bad:
        logger.warning("%s: skipped %d line(s) that are not JSON records with an iteration", path, bad)
    if not any(by_split.values()):
        raise ValueError(f"{path}: no training or evaluation records")
    return RunLog(name or path.stem, str(path), _curves(by_split[None]), _curves(by_split["valid"]),
                  _curves(by_split["test"]), bad)


def smooth(values: Sequence[float], weight: float) -> List[float]:
    """TensorBoard's smoothing: an exponential moving average with weight ``weight`` in [0, 1),
    debiased at the start (so the first point is the first value, not a pull towards 0)."""
    if not 0 <= weight < 1:
        raise ValueError(f"--smoothing must be in [0, 1), got {weight}")
    out, last = [], 0.0
    for i, value in enumerate(values):
        last = last * weight + (1 - weight) * value
        out.append(last / (1 - weight ** (i + 1)))
    return out


def summarize(run: RunLog) -> Dict[str, Optional[float]]:
    """One table row: the ``COLUMNS`` values of this run (None where the run has no such value)."""
    row: Dict[str, Optional[float]] = {}
    for header, where, key, reduction in COLUMNS:
        if where == "eval":
            value = run.eval_metrics.get(key)
            row[header] = float(value) if isinstance(value, (int, float)) else None
            continue
        curve = getattr(run, where).get(key)
        if key == "iteration":
            curve = run.train.get("lm_loss")
            row[header] = float(curve[0][-1]) if curve else None
        elif curve:
            row[header] = curve[1][-1] if reduction == "last" else min(curve[1])
        else:
            row[header] = None
    return row


def format_table(runs: Sequence[RunLog]) -> str:
    """Runs as columns, metrics as rows (columns without any value are left out)."""
    rows = {run.name: summarize(run) for run in runs}
    headers = [h for h, *_ in COLUMNS if any(r[h] is not None for r in rows.values())]

    def cell(value: Optional[float], header: str) -> str:
        if value is None:
            return "-"
        return str(int(value)) if header == "iterations" else f"{value:.4f}"

    table = [["", *rows]] + [[h, *(cell(r[h], h) for r in rows.values())] for h in headers]
    widths = [max(len(line[c]) for line in table) for c in range(len(table[0]))]
    return "\n".join("  ".join(text.ljust(w) if c == 0 else text.rjust(w) for c, (text, w) in
                               enumerate(zip(line, widths))) for line in table)


def plot_runs(runs: Sequence[RunLog], out: str | Path, keys: Sequence[str] = ("lm_loss", "gva_loss"),
              smoothing: float = 0.0, valid: bool = True) -> Path:
    """One panel per key (train curves; the validation lm loss in its own panel when present),
    a line per run, raw values faint behind the smoothed ones. Written with matplotlib's Agg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("train", k) for k in keys if any(k in r.train for r in runs)]
    if valid:
        panels += [("valid", "lm_loss")] if any("lm_loss" in r.valid for r in runs) else []
    if not panels:
        raise ValueError(f"none of the runs has any of {list(keys)} to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (where, key) in zip(axes[0], panels):
        for i, run in enumerate(runs):
            curve = (run.train if where == "train" else run.valid).get(key)
            if not curve:
                continue
            color = f"C{i}"
            its, values = curve
            if smoothing > 0 and where == "train":
                ax.plot(its, values, color=color, alpha=0.25, linewidth=0.8)
                values = smooth(values, smoothing)
            ax.plot(its, values, color=color, label=run.name, marker="o" if where == "valid" else None,
                    markersize=3)
        ax.set_title(f"{'validation' if where == 'valid' else 'train'} {key.replace('_', ' ')}")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out

