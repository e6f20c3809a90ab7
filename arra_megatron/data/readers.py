"""Readers of raw (image, condition) inputs for the dataset builder.

Three input kinds, each a list of work units that the builder splits into parts:
- ``tar``: webdataset shards in img2dataset layout (``KEY.jpg|png|webp``, ``KEY.txt``
  caption, ``KEY.json`` metadata); units are shards.
- ``csv`` / ``jsonl``: one row per sample, image path column + caption column or a
  ``--prompt-template`` over columns; units are rows.
- ``folder``: ImageNet-style ``ROOT/CLASS/IMAGE`` tree, class-id condition; units are files.

Readers never raise on bad data: a sample that cannot be used comes out with a
``skip`` reason (see ``SKIP_REASONS``) so the builder counts it and carries on.
Every good sample carries an ``ImageRef`` (file, byte offset, length) so training
can read the encoded image bytes directly, e.g. a member inside a tar shard.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import string
import tarfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

SKIP_REASONS: Dict[str, str] = {
    "image_missing": "no image member in the tar group, or the image file does not exist",
    "image_empty": "the image file or member has 0 bytes",
    "image_undecodable": "PIL cannot decode the image (corrupt, truncated, unsupported format)",
    "caption_missing": "no caption (KEY.txt absent, or a caption/template column absent)",
    "caption_empty": "the caption (or a template field) is empty or whitespace",
    "caption_not_utf8": "the caption bytes are not valid UTF-8",
    "bad_record": "a JSONL line that is not a JSON object",
    "tar_truncated": "a tar shard ends in the middle of the archive (read up to the damage; counted per shard)",
    "tar_unreadable": "a tar shard that is missing or not a tar archive at all (counted per shard)",
}
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_BLOCK = 512


@dataclass(frozen=True)
class ImageRef:
    """Where a sample's encoded image bytes live: ``open(source).seek(offset).read(length)``."""

    source: str
    offset: int
    length: int


@dataclass
class RawSample:
    """One input sample before tokenization; ``skip`` is set when the reader already knows it is unusable."""

    key: str
    image: Optional[bytes] = None
    caption: Optional[bytes] = None  # raw bytes: UTF-8 validity is checked in one place, check_sample
    class_id: Optional[int] = None
    ref: Optional[ImageRef] = None
    skip: Optional[str] = None


def check_sample(sample: RawSample, needs_caption: bool) -> Tuple[Optional[str], Optional[str]]:
    """(skip reason or None, caption stripped of surrounding whitespace) for a sample from any reader."""
    if sample.skip is not None:
        return sample.skip, None
    if sample.image is None:
        return "image_missing", None
    if not sample.image:
        return "image_empty", None
    if not needs_caption:
        return None, None
    if sample.caption is None:
        return "caption_missing", None
    try:
        caption = sample.caption.decode("utf-8")
    except UnicodeDecodeError:
        return "caption_not_utf8", None
    if not caption.strip():
        return "caption_empty", None
    return None, caption.strip()


def decode_sample(sample: RawSample, needs_caption: bool) -> Tuple[Optional[str], Optional[str], Optional[Any]]:
    """``check_sample``, then the image fully decoded to RGB: (skip reason or None, caption, PIL image).

    The one place the builder and ``tools/train_vq.py`` turn a raw sample into a usable one; an
    image PIL cannot decode is the skip reason ``image_undecodable``."""
    from arra_megatron.tokenization.image import ImageDecodeError, load_rgb

    reason, caption = check_sample(sample, needs_caption)
    if reason is not None:
        return reason, None, None
    try:
        return None, caption, load_rgb(sample.image)
    except ImageDecodeError as error:
        logger.debug("%s: %s", sample.key, error)
        return "image_undecodable", None, None


def _fingerprint(entries: Sequence[Tuple[Any, ...]]) -> str:
    """Hash of (name, size, ...) tuples: a resumed build must see the same inputs."""
    digest = hashlib.sha256()
    for entry in entries:
        digest.update(("\0".join(map(str, entry)) + "\n").encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _stat_entry(path: Path) -> Tuple[str, int, int]:
    try:
        st = path.stat()
        return str(path), st.st_size, st.st_mtime_ns
    except OSError:
        return str(path), -1, -1


class InputSource(ABC):
    """A list of work units (``units``) and a way to read the samples of a unit range."""

    kind: str
    condition: str  # "text" or "class"
    class_names: List[str] = []
    units: Sequence[Any]

    @abstractmethod
    def read(self, start: int, stop: int) -> Iterator[RawSample]:
        """Samples of units [start, stop), in input order."""

    @abstractmethod
    def describe(self) -> Dict[str, Any]:
        """JSON description for the manifest; includes a fingerprint of the inputs' names and sizes."""


class TarShardSource(InputSource):
    """img2dataset webdataset shards: ``shards/{00000..00009}.tar``, a single tar, or a directory of tars."""

    kind = "tar"
    condition = "text"

    def __init__(self, pattern: str) -> None:
        import braceexpand

        self.pattern = pattern
        # Absolute paths: the image reference table must stay valid from any working directory.
        if Path(pattern).is_dir():
            self.units = sorted(str(p.absolute()) for p in Path(pattern).glob("*.tar"))
        else:
            self.units = [os.path.abspath(p) for p in braceexpand.braceexpand(pattern)]
        if not self.units:
            raise FileNotFoundError(f"--input {pattern}: no tar shards")

    def describe(self) -> Dict[str, Any]:
        return {"kind": self.kind, "input": self.pattern, "units": len(self.units),
                "fingerprint": _fingerprint([_stat_entry(Path(p)) for p in self.units])}

    def read(self, start: int, stop: int) -> Iterator[RawSample]:
        for shard in self.units[start:stop]:
            yield from read_tar_shard(shard)


def _split_key(name: str) -> Tuple[str, str]:
    """webdataset's convention: the key is the path up to the first dot of the file name."""
    directory, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def read_tar_shard(shard: str) -> Iterator[RawSample]:
    """Samples of one img2dataset tar shard, grouped by key; stops at the first damage.

    Damage is detected because Python's tarfile silently treats a cut or garbled
    header as the end of the archive: a shard is complete only if the member data
    fits in the file and iteration ends on an end-of-archive (all-zero) block.
    """
    try:
        handle = open(shard, "rb")
        size = os.fstat(handle.fileno()).st_size
    except OSError as error:
        logger.warning("tar shard %s unreadable: %s", shard, error)
        yield RawSample(key=shard, skip="tar_unreadable")
        return
    with handle:
        try:
            archive = tarfile.open(fileobj=handle, mode="r:")
        except tarfile.TarError as error:
            logger.warning("tar shard %s unreadable: %s", shard, error)
            yield RawSample(key=shard, skip="tar_unreadable")
            return
        group: Optional[RawSample] = None
        damaged = False
        while True:
            try:
                member = archive.next()
            except tarfile.TarError:
                damaged = True
                break
            if member is None:
                handle.seek(archive.offset)
                damaged = handle.read(_BLOCK) != bytes(_BLOCK)
                break
            if not member.isfile():
                continue
            if member.offset_data + member.size > size:
                damaged = True
                break
            key, extension = _split_key(member.name)
            if group is None or key != group.key:
                if group is not None:
                    yield group
                group = RawSample(key=key)
            if extension in _TAR_IMAGE_EXTENSIONS and group.image is None:
                handle.seek(member.offset_data)
                group.image = handle.read(member.size)
                group.ref = ImageRef(shard, member.offset_data, member.size)
            elif extension == "txt":
                handle.seek(member.offset_data)
                group.caption = handle.read(member.size)
        if group is not None:
            yield group
        if damaged:
            logger.warning("tar shard %s is truncated or damaged after %d members", shard, len(archive.members))
            yield RawSample(key=shard, skip="tar_truncated")


def _read_file(path: Path) -> Tuple[Optional[bytes], Optional[ImageRef]]:
    try:
        data = path.read_bytes()
    except OSError:
        return None, None
    return data, ImageRef(str(path), 0, len(data))


class TableSource(InputSource):
    """CSV or JSONL rows: an image path column and a caption column or a prompt template over columns."""

    condition = "text"

    def __init__(self, path: str, kind: str, image_root: Optional[str], image_column: str,
                 caption_column: Optional[str], prompt_template: Optional[str]) -> None:
        self.path = Path(path)
        self.kind = kind
        self.image_root = (Path(image_root) if image_root else self.path.parent).absolute()
        self.image_column = image_column
        self.caption_column = caption_column or ("caption" if prompt_template is None else None)
        self.prompt_template = prompt_template or "{" + self.caption_column + "}"
        self.fields = [name for _, name, _, _ in string.Formatter().parse(self.prompt_template) if name]
        if not self.path.is_file():
            raise FileNotFoundError(f"--input {path}: no such file")
        # surrogateescape keeps non-UTF-8 bytes so that one row, not the whole file, is skipped.
        with open(self.path, encoding="utf-8", errors="surrogateescape", newline="") as f:
            if kind == "csv":
                reader = csv.DictReader(f)
                missing = [c for c in [image_column, *self.fields] if c not in (reader.fieldnames or [])]
                if missing:
                    raise ValueError(f"--input {path}: columns {missing} not in the CSV header "
                                     f"{reader.fieldnames}; fix --image-column / --caption-column / --prompt-template")
                self.units: List[Optional[Dict[str, Any]]] = list(reader)
            else:
                self.units = [_parse_json_line(line) for line in f if line.strip()]
        logger.info("%s: %d rows", path, len(self.units))

    def describe(self) -> Dict[str, Any]:
        return {"kind": self.kind, "input": str(self.path.resolve()), "units": len(self.units),
                "image_root": str(self.image_root), "image_column": self.image_column,
                "prompt_template": self.prompt_template,
                "fingerprint": _fingerprint([_stat_entry(self.path)])}

    def read(self, start: int, stop: int) -> Iterator[RawSample]:
        for row_number, record in enumerate(self.units[start:stop], start):
            key = f"row-{row_number}"
            if record is None:
                yield RawSample(key=key, skip="bad_record")
                continue
            image_name = record.get(self.image_column)
            image, ref = _read_file(self.image_root / str(image_name)) if image_name else (None, None)
            yield RawSample(key=key, image=image, ref=ref, caption=self._caption(record))

    def _caption(self, record: Dict[str, Any]) -> Optional[bytes]:
        """The prompt as raw bytes; a missing field gives None, an empty one b"" (see check_sample)."""
        values = {name: record.get(name) for name in self.fields}
        if any(value is None for value in values.values()):
            return None
        values = {name: str(value) for name, value in values.items()}
        if any(not value.strip() for value in values.values()):
            return b""
        return self.prompt_template.format_map(values).encode("utf-8", "surrogateescape")


def _parse_json_line(line: str) -> Optional[Dict[str, Any]]:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _input_directory(root: str) -> Path:
    path = Path(root).absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"--input {root}: not a directory")
    return path


def _image_files(directory: Path) -> List[str]:
    """The image files under ``directory`` at any depth, in sorted path order."""
    return [str(path) for path in sorted(directory.rglob("*"))
            if path.is_file() and path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS]


class ClassFolderSource(InputSource):
    """``ROOT/CLASS/IMAGE``: class ids follow the sorted class directory names (torchvision ImageFolder order)."""

    kind = "folder"
    condition = "class"

    def __init__(self, root: str) -> None:
        self.root = _input_directory(root)
        self.class_names = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.class_names:
            raise ValueError(f"--input {root}: no class sub-directories")
        self.units: List[Tuple[int, str]] = [(class_id, path) for class_id, name in enumerate(self.class_names)
                                             for path in _image_files(self.root / name)]

    def describe(self) -> Dict[str, Any]:
        listing = [(os.path.relpath(p, self.root), os.path.getsize(p)) for _, p in self.units]
        return {"kind": self.kind, "input": str(self.root), "units": len(self.units),
                "classes": self.class_names, "fingerprint": _fingerprint(listing)}

    def read(self, start: int, stop: int) -> Iterator[RawSample]:
        for class_id, path in self.units[start:stop]:
            image, ref = _read_file(Path(path))
            yield RawSample(key=os.path.relpath(path, self.root), image=image, ref=ref, class_id=class_id)


class ImageDirectorySource(InputSource):
    """Every image file under a directory (any depth), sorted, without a condition: ``--input-kind images`` of
    tools/train_vq.py (the builder needs a condition per sample)."""

    kind = "images"
    condition = "none"

    def __init__(self, root: str) -> None:
        self.root = _input_directory(root)
        self.units = _image_files(self.root)

    def describe(self) -> Dict[str, Any]:
        listing = [(os.path.relpath(p, self.root), os.path.getsize(p)) for p in self.units]
        return {"kind": self.kind, "input": str(self.root), "units": len(self.units),
                "fingerprint": _fingerprint(listing)}

    def read(self, start: int, stop: int) -> Iterator[RawSample]:
        for path in self.units[start:stop]:
            image, ref = _read_file(Path(path))
            yield RawSample(key=os.path.relpath(path, self.root), image=image, ref=ref)


def detect_kind(path: str) -> str:
    """``--input-kind auto``: tar for brace patterns, .tar files and directories of tars; else by suffix."""
    p = Path(path)
    if "{" in path or p.suffix == ".tar":
        return "tar"
    if p.is_dir():
        return "tar" if any(p.glob("*.tar")) else "folder"
    if p.suffix.lower() in (".csv", ".jsonl"):
        return p.suffix.lower().lstrip(".")
    raise ValueError(f"--input {path}: cannot tell its kind; pass --input-kind tar|csv|jsonl|folder")


def open_source(path: str, kind: str = "auto", image_root: Optional[str] = None, image_column: str = "image",
                caption_column: Optional[str] = None, prompt_template: Optional[str] = None) -> InputSource:
    """Build the reader for ``--input`` and ``--input-kind``."""
    kind = detect_kind(path) if kind == "auto" else kind
    if kind == "tar":
        return TarShardSource(path)
    if kind in ("csv", "jsonl"):
        return TableSource(path, kind, image_root, image_column, caption_column, prompt_template)
    if kind == "folder":
        return ClassFolderSource(path)
    if kind == "images":
        return ImageDirectorySource(path)
    raise ValueError(f"--input-kind {kind}: expected auto, tar, csv, jsonl, folder or images")
