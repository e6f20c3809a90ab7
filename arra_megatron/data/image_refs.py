"""The image reference table of a dataset prefix, and reading encoded image bytes through it.

``PREFIX.images.npy`` holds one ``IMAGE_REF_DTYPE`` record per sample (``source``,
``offset``, ``length``); ``source`` indexes the path list in
``PREFIX.images.sources.json``. A sample's encoded image is
``open(path).seek(offset).read(length)``: a member inside a tar shard or a whole
image file. The builder writes the table; training (online targets) and
``tools/precompute_features.py`` read images through ``read_image_bytes``, so
there is one code path from a sample id to the bytes DALI decodes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Sequence, Union

import numpy as np

IMAGE_REF_DTYPE = np.dtype([("source", "<i4"), ("offset", "<i8"), ("length", "<i8")])


@dataclass
class ImageRefTable:
    """``refs[i]`` locates sample i's image in file ``sources[refs[i]["source"]]``."""

    refs: np.ndarray
    sources: List[str]
    prefix: str = ""

    @classmethod
    def load(cls, prefix: str, mmap: bool = True) -> "ImageRefTable":
        """Read ``PREFIX.images.npy`` (memory-mapped by default) and ``PREFIX.images.sources.json``."""
        refs_file, sources_file = f"{prefix}.images.npy", f"{prefix}.images.sources.json"
        for path in (refs_file, sources_file):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} not found: {prefix} has no image reference table (rebuild it with "
                                        "tools/build_indexed_dataset.py)")
        refs = np.load(refs_file, mmap_mode="r" if mmap else None)
        if refs.dtype != IMAGE_REF_DTYPE:
            raise ValueError(f"{refs_file}: dtype {refs.dtype}, expected {IMAGE_REF_DTYPE}")
        with open(sources_file, encoding="utf-8") as f:
            sources = json.load(f)
        return cls(refs, sources, str(prefix))

    def __len__(self) -> int:
        return len(self.refs)


def read_image_bytes(prefix_or_tables: Union[str, ImageRefTable], indices: Sequence[int]) -> List[bytes]:
    """Encoded image bytes of samples ``indices``, in that order.

    Reads are grouped by source file (one open handle per source, seeks in offset
    order), so a batch whose samples share a tar shard costs one ``open``. Raises
    FileNotFoundError / OSError naming the file when a source is gone or shorter than
    the table says (the data moved or changed since the build): a setup error, unlike an
    image that does not decode, which the DALI pipeline masks per sample.
    """
    table = prefix_or_tables if isinstance(prefix_or_tables, ImageRefTable) else ImageRefTable.load(prefix_or_tables)
    positions = np.asarray(indices, dtype=np.int64).reshape(-1)
    if positions.size and (positions.min() < -len(table) or positions.max() >= len(table)):
        raise IndexError(f"sample index out of range for {table.prefix or 'the image table'} "
                         f"({len(table)} samples): {positions.min()}..{positions.max()}")
    refs = np.asarray(table.refs[positions])
    out: List[bytes] = [b""] * len(refs)
    by_source: Dict[int, List[int]] = {}
    for i in np.argsort(refs["offset"], kind="stable"):
        by_source.setdefault(int(refs["source"][i]), []).append(int(i))
    for source, rows in by_source.items():
        path = table.sources[source]
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} (image source of {table.prefix or 'the dataset'}) not found: the "
                                    "images moved since the build; rebuild or restore the files") from None
        with handle:
            for i in rows:
                handle.seek(int(refs["offset"][i]))
                length = int(refs["length"][i])
                out[i] = handle.read(length)
                if len(out[i]) != length:
                    raise OSError(f"{path}: {length} bytes expected at offset {int(refs['offset'][i])}, "
                                  f"got {len(out[i])}; the file changed since {table.prefix or 'the build'}")
    return out
