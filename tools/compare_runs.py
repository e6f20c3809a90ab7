#!/usr/bin/env python
"""Put training runs side by side: a table of final/min losses (+ evaluation metrics) and a PNG of the curves.

Each RUN is NAME=LOG.jsonl (or just LOG.jsonl: the name is the file's stem), LOG.jsonl being the
--log-json file of examples/pretrain_arra.py. --eval NAME=REPORT.json adds a tools/evaluate.py report
to that run.

Examples:
    python tools/compare_runs.py arra=runs/arra/log.jsonl baseline=runs/base/log.jsonl \\
        --eval arra=samples_arra/evaluation.json --eval baseline=samples_base/evaluation.json \\
        --plot compare.png --smoothing 0.9

Exit status: 0 done, 2 bad flags or inputs (missing log, no records, unknown run name in --eval).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from arra_megatron.evaluation.runs import format_table, plot_runs, read_metrics_log, summarize
from arra_megatron.fileio import write_json_atomic

logger = logging.getLogger("compare_runs")


def _named(text: str) -> Tuple[Optional[str], str]:
    name, sep, path = text.partition("=")
    return (name, path) if sep and name and not Path(text).exists() else (None, text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="NAME=LOG.jsonl or LOG.jsonl")
    p.add_argument("--eval", action="append", default=[], metavar="NAME=REPORT.json",
                   help="an evaluate.py report for the run NAME (repeat per run)")
    p.add_argument("--plot", metavar="OUT.png", help="write the loss curves here")
    p.add_argument("--keys", nargs="+", default=["lm_loss", "gva_loss"], help="training curves to plot")
    p.add_argument("--smoothing", type=float, default=0.0, help="EMA weight in [0, 1) for the training curves")
    p.add_argument("--output", metavar="OUT.json", help="also write the table as JSON")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not 0 <= args.smoothing < 1:
        parser.error(f"--smoothing must be in [0, 1), got {args.smoothing}")
    try:
        runs = [read_metrics_log(path, name) for name, path in map(_named, args.runs)]
        by_name = {run.name: run for run in runs}
        if len(by_name) != len(runs):
            raise ValueError("two runs have the same name; name them: NAME=LOG.jsonl")
        for entry in args.eval:
            name, path = _named(entry)
            if name not in by_name:
                raise ValueError(f"--eval {entry}: expected NAME=REPORT.json with NAME one of {sorted(by_name)}")
            with open(path, encoding="utf-8") as f:
                by_name[name].eval_metrics = json.load(f).get("metrics", {})
        if args.plot:
            logger.info("wrote %s", plot_runs(runs, args.plot, args.keys, args.smoothing))
    except (FileNotFoundError, ValueError) as error:  # json.JSONDecodeError is a ValueError
        logger.error("%s", error)
        return 2
    if args.output:
        write_json_atomic(args.output, {run.name: {"log": run.path, **summarize(run)} for run in runs})
    print(format_table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
