"""Sampled codes -> pixels (the dataset's VQ decoder) -> PNG files, an image grid, and ``samples.jsonl``.

``samples.jsonl`` has one line per image, in sample order:
``{"file": "000000.png", "prompt": "..." | "class_id": n, "seed": s, "codes": [...]}``
(``file`` relative to the output directory; ``codes`` the VQ codes in raster order, so an
image can be decoded again without sampling). tools/evaluate.py reads it.
"""

from __future__ import annotations

import json
import os
from typing import List, Sequence

import torch
from torchvision.utils import make_grid, save_image

INDEX_FILE = "samples.jsonl"
GRID_FILE = "grid.png"
MAX_GRID_IMAGES = 64


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """VQ decoder output (about [-1, 1]) -> [0, 1], as LlamaGen saves its samples."""
    return ((pixels.float() + 1) / 2).clamp(0, 1)


class SampleWriter:
    """Writes each batch's images as they come; the grid (the first 64 images) at ``close``."""

    def __init__(self, out_dir: str, decode, grid_nrow: int = 8):
        if os.path.exists(os.path.join(out_dir, INDEX_FILE)):
            raise FileExistsError(f"--out-dir {out_dir} already holds {INDEX_FILE}; choose a new directory")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.decode, self.grid_nrow = out_dir, decode, grid_nrow
        self.count = 0
        self.grid: List[torch.Tensor] = []
        self.index = open(os.path.join(out_dir, INDEX_FILE), "w", encoding="utf-8")

    def add(self, codes: torch.Tensor, records: Sequence[dict]) -> List[str]:
        """Decode ``[b, n]`` codes and write one PNG and one index line per image; the file names."""
        images = to_unit_range(self.decode(codes))
        names = []
        for image, row, record in zip(images, codes, records):
            name = f"{self.count:06d}.png"
            save_image(image, os.path.join(self.out_dir, name))
            self.index.write(json.dumps({"file": name, **record, "codes": row.tolist()}) + "\n")
            if len(self.grid) < MAX_GRID_IMAGES:
                self.grid.append(image)
            names.append(name)
            self.count += 1
        self.index.flush()
        return names

    def close(self) -> None:
        self.index.close()
        if self.grid:
            save_image(make_grid(torch.stack(self.grid), nrow=self.grid_nrow, padding=2),
                       os.path.join(self.out_dir, GRID_FILE))
