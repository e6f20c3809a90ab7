"""Image folders for evaluation: listing, decoding that survives bad files, prompts.

A folder is every file with an image extension below it (recursively, sorted by relative
path, so an ImageNet-style ``CLASS/IMAGE`` reference tree works too). Decoding goes
through the dataset builder's own ``load_rgb`` (full decode, any PIL mode -> 8-bit RGB);
a file that is empty or that PIL cannot decode is skipped and counted under the builder's
reason names (``image_empty``, ``image_undecodable``), never raised.

Prompts for CLIP-Score come from ``samples.jsonl`` beside the generated images (or a file
given with ``--prompts``): one JSON object per line, ``{"file": "000000.png", "prompt":
"PA view chest X-ray image, ..."}``, ``file`` relative to the folder. Other keys
(``class_id``, ``seed``, ...) are allowed and ignored.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from arra_megatron.data.readers import IMAGE_EXTENSIONS, SKIP_REASONS
from arra_megatron.tokenization.image import ImageDecodeError, load_rgb, resize_center_crop

logger = logging.getLogger(__name__)

PROMPTS_FILE = "samples.jsonl"
#: How many skipped file names a report lists per reason (the counts are always complete).
MAX_LISTED_SKIPS = 20


def list_images(folder: str | Path, flag: str) -> List[Path]:
    """Image files below ``folder``, sorted; ``flag`` names the option in error messages."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{flag} {root}: no such directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{flag} {root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this directory")
    return files


@dataclass
class SkipLog:
    """Files that could not be used, counted by reason (reason names as the dataset builder's)."""

    counts: Counter = field(default_factory=Counter)
    files: Dict[str, List[str]] = field(default_factory=dict)

    def add(self, reason: str, path: Path, detail: str = "") -> None:
        self.counts[reason] += 1
        listed = self.files.setdefault(reason, [])
        if len(listed) < MAX_LISTED_SKIPS:
            listed.append(str(path))
        logger.warning("skipping %s (%s%s)", path, reason, f": {detail}" if detail else "")

    def to_dict(self) -> Dict[str, object]:
        return {"skipped": dict(self.counts), "skipped_files": self.files,
                "skip_reasons": {r: SKIP_REASONS[r] for r in self.counts}}


def read_image(path: Path, size: Optional[int] = None) -> Image.Image:
    """Decoded RGB image; ``size``: resize the short side and centre-crop a square (reference sets
    of mixed sizes). Raises ``ImageDecodeError`` (empty file included)."""
    data = path.read_bytes()
    if not data:
        raise ImageDecodeError("empty file")
    image = load_rgb(data)
    return resize_center_crop(image, size, Image.Resampling.BICUBIC) if size else image


class _Decoded(torch.utils.data.Dataset):
    """index -> (index, RGB image or None, skip reason, detail); runs in DataLoader workers."""

    def __init__(self, files: Sequence[Path], size: Optional[int]) -> None:
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tuple[int, Optional[Image.Image], str, str]:
        path = self.files[index]
        try:
            return index, read_image(path, self.size), "", ""
        except ImageDecodeError as error:
            reason = "image_empty" if str(error) == "empty file" else "image_undecodable"
            return index, None, reason, str(error)


def iterate_images(files: Sequence[Path], skips: SkipLog, batch_size: int, workers: int = 0,
                   size: Optional[int] = None, progress: Optional[str] = None
                   ) -> Iterator[Tuple[List[int], List[Image.Image]]]:
    """Batches of (file indices, decoded images) in file order; bad files go to ``skips``.
    ``progress``: a tqdm bar with this label, counting files."""
    loader = torch.utils.data.DataLoader(_Decoded(files, size), batch_size=batch_size, num_workers=workers,
                                         collate_fn=list)
    for batch in tqdm(loader, desc=progress, unit="batch", disable=progress is None):
        good = [(i, image) for i, image, _, _ in batch if image is not None]
        for i, image, reason, detail in batch:
            if image is None:
                skips.add(reason, files[i], detail)
        if good:
            yield [i for i, _ in good], [image for _, image in good]


def to_uint8(images: Sequence[Image.Image]) -> List[torch.Tensor]:
    """PIL RGB -> uint8 [3, H, W] tensors (the input torch-fidelity's extractors take)."""
    return [torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1) for image in images]


def stack_by_shape(tensors: Sequence[torch.Tensor]) -> Iterator[Tuple[List[int], torch.Tensor]]:
    """Group same-shape tensors into one batch each (positions within ``tensors``, stacked)."""
    groups: Dict[Tuple[int, ...], List[int]] = {}
    for position, tensor in enumerate(tensors):
        groups.setdefault(tuple(tensor.shape), []).append(position)
    for positions in groups.values():
        yield positions, torch.stack([tensors[p] for p in positions])


def read_prompts(path: Path, root: Path, files: Sequence[Path]) -> List[str]:
    """The prompt of each file in ``files`` from a ``samples.jsonl``-style index (see module doc)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompts index not found; CLIP-Score needs one JSON line "
                                f'{{"file": ..., "prompt": ...}} per generated image (--prompts)')
    prompts: Dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                name, prompt = record["file"], record["prompt"]
            except (json.JSONDecodeError, TypeError, KeyError) as error:
                raise ValueError(f"{path}:{number}: expected a JSON object with 'file' and 'prompt' "
                                 f"({type(error).__name__}: {error})") from error
            if not isinstance(prompt, str):
                raise ValueError(f"{path}:{number}: 'prompt' must be a string, got {type(prompt).__name__}")
            prompts[Path(name).as_posix()] = prompt
    missing = [p for p in files if p.relative_to(root).as_posix() not in prompts]
    if missing:
        names = ", ".join(p.relative_to(root).as_posix() for p in missing[:5])
        raise ValueError(f"{path}: no prompt for {len(missing)} of {len(files)} images (e.g. {names})")
    return [prompts[p.relative_to(root).as_posix()] for p in files]
