"""Sampled codes -> pixels (the dataset's VQ decoder) -> PNG files, an image grid, and ``samples.jsonl``.

``samples.jsonl`` has one line per image, in sample order:
``{"file": "000000.png", "prompt": "..." | "class_id": n, "seed": s, "codes": [...]}``
(``file`` relative to the output directory, named by the image's place in the request;
``codes`` the VQ codes in raster order, so an image can be decoded again without
sampling). tools/evaluate.py reads it.

While sampling, each data-parallel replica appends its lines to a shard of its own
(``samples.part-R-of-N.jsonl``, flushed per batch, after the batch's PNGs): a rerun reads
the shards and skips the images they hold, whatever the number of replicas then. Once
every image is there, ``merge`` writes ``samples.jsonl`` (atomically) and ``grid.png``
and removes the shards.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Dict, List, Sequence

import torch
from torchvision.io import ImageReadMode, read_image
from torchvision.utils import make_grid, save_image

INDEX_FILE = "samples.jsonl"
GRID_FILE = "grid.png"
MAX_GRID_IMAGES = 64
SHARD_PATTERN = "samples.part-*.jsonl"


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """VQ decoder output (about [-1, 1]) -> [0, 1], as LlamaGen saves its samples."""
    return ((pixels.float() + 1) / 2).clamp(0, 1)


def image_name(index: int) -> str:
    return f"{index:06d}.png"


class SampleWriter:
    """Writes each batch's images and appends their index lines to this replica's shard."""

    def __init__(self, out_dir: str, decode, replica: int = 0, replicas: int = 1):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.decode = out_dir, decode
        path = os.path.join(out_dir, f"samples.part-{replica:05d}-of-{replicas:05d}.jsonl")
        _cut_to_last_line(path)
        self.index = open(path, "a", encoding="utf-8")

    def add(self, codes: torch.Tensor, records: Sequence[dict], indices: Sequence[int]) -> List[str]:
        """Decode ``[b, n]`` codes; write image ``indices[i]`` as a PNG, then the batch's index lines."""
        images = to_unit_range(self.decode(codes))
        names = [image_name(i) for i in indices]
        for image, name in zip(images, names):
            save_image(image, os.path.join(self.out_dir, name))
        for name, row, record in zip(names, codes, records):
            self.index.write(json.dumps({"file": name, **record, "codes": row.tolist()}) + "\n")
        self.index.flush()
        return names

    def close(self) -> None:
        self.index.close()


def _cut_to_last_line(path: str) -> None:
    """Drop a last line cut by a crash, so the next record starts on a line of its own."""
    if not os.path.isfile(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


class IncompleteSamples(RuntimeError):
    """Some requested images are missing from the output directory after sampling."""


def recorded(out_dir: str) -> Dict[int, dict]:
    """The images the shards of ``out_dir`` hold (index -> line), PNG present; a line cut by a crash is ignored."""
    found: Dict[int, dict] = {}
    for shard in sorted(glob.glob(os.path.join(out_dir, SHARD_PATTERN))):
        with open(shard, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if os.path.isfile(os.path.join(out_dir, record["file"])):
                    found.setdefault(int(record["file"].split(".")[0]), record)
    return found


def merge(out_dir: str, total: int, grid_nrow: int = 8) -> None:
    """``samples.jsonl`` (images 0 .. total-1, in order) and ``grid.png`` from the shards, which go."""
    found = recorded(out_dir)
    missing = [i for i in range(total) if i not in found]
    if missing:
        raise IncompleteSamples(f"{out_dir}: {len(missing)} of {total} images missing after sampling "
                           f"(first: {image_name(missing[0])}); rerun the same command to finish them")
    tmp = os.path.join(out_dir, f"{INDEX_FILE}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(total):
            f.write(json.dumps(found[i]) + "\n")
    os.replace(tmp, os.path.join(out_dir, INDEX_FILE))
    grid = [read_image(os.path.join(out_dir, image_name(i)), ImageReadMode.RGB).float() / 255
            for i in range(min(total, MAX_GRID_IMAGES))]
    if grid:
        save_image(make_grid(torch.stack(grid), nrow=grid_nrow, padding=2), os.path.join(out_dir, GRID_FILE))
    for shard in glob.glob(os.path.join(out_dir, SHARD_PATTERN)):
        os.remove(shard)
