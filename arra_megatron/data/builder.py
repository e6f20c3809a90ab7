"""Offline dataset builder: raw (image, condition) inputs -> an ARRA dataset prefix.

Output (ARCHITECTURE.md, "Datasets on disk"):
- ``PREFIX.bin/.idx``: Megatron-Core IndexedDataset, one document per sample,
  ``[BOS] condition [BOI] x_1..x_n [EOI] [EOS]`` (tokenization/profile.py).
- ``PREFIX.images.npy``: per sample ``(source, offset, length)`` (``IMAGE_REF_DTYPE``);
  ``source`` indexes the path list in ``PREFIX.images.sources.json``. The image
  bytes are ``open(path).seek(offset).read(length)``: a member inside a tar shard
  or a whole image file.
- ``PREFIX.features.npy`` (with ``--encoder``): precomputed ARRA targets f_GF, a float16
  [N, D] ``.npy`` to memory-map, row i belonging to document i. f_GF comes from the same
  image bytes through the code training uses online (``make_image_preprocessor`` ->
  ``TargetEncoder.encode``); a sample whose image that pipeline cannot decode keeps its
  tokens and gets a NaN row: no alignment target (its L_GVA term is masked).
- ``PREFIX.json``: the manifest (``manifest.DatasetManifest``), written last; its presence
  marks a finished dataset. Its ``features`` (``FeatureTable``: file, shape [N, D], encoder
  identity, aggregation, preprocessing, samples without target) is None without an
  encoder (``tools/precompute_features.py`` adds one to a finished dataset).

Work is split into parts (contiguous ranges of input units: shards, rows, files)
built independently into ``PREFIX.parts/part-NNNNN.*`` and merged in order with
``IndexedDatasetBuilder.add_index``. A part is finished when its JSON marker exists:
the marker is written last and atomically (rename), so a rerun after a crash
rebuilds only unfinished parts and, since a part's bytes depend only on its inputs
and the plan (``PREFIX.parts/plan.json``), merges to the same bytes as an
uninterrupted build.

Many processes (torchrun over nodes, srun, a SLURM array, or a second submit of the
same command) share one build: each claims parts (build_ranks.py), the one that finds
every part finished merges, and the result is byte-identical to a one-process build.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import time
import uuid
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Type

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from tqdm import tqdm

from arra_megatron.data.build_ranks import BuildRank, Claims, unclaimed
from arra_megatron.data.dali_pipeline import make_image_preprocessor
from arra_megatron.data.image_refs import IMAGE_REF_DTYPE, ImageRefTable, read_image_bytes
from arra_megatron.data.manifest import BuildCounts, DatasetFiles, DatasetManifest, FeatureTable, manifest_path
from arra_megatron.data.readers import SKIP_REASONS, InputSource, decode_sample, open_source
from arra_megatron.encoders import TargetEncoder, load_encoder
from arra_megatron.fileio import check_json_plan, write_json_atomic
from arra_megatron.runtime.capabilities import resolve_device
from arra_megatron.runtime.faults import kill_after
from arra_megatron.tokenization.image import ImageTokenizer
from arra_megatron.tokenization.profile import NUM_FRAME_TOKENS, TokenizerProfile
from arra_megatron.tokenization.text import TextTokenizer

logger = logging.getLogger(__name__)

BUILDER_VERSION = "1"
FEATURE_DTYPE = np.dtype(np.float16)
UNITS_PER_PART = 1000  # default part size for row / file inputs (tar inputs: one shard per part)


@dataclass
class BuildConfig:
    """Settings of one build; each field is the CLI flag of the same name (tools/build_indexed_dataset.py)."""

    input: str
    output_prefix: str
    image_tokenizer: str
    image_size: int
    max_seq_length: int
    text_tokenizer: Optional[str] = None
    input_kind: str = "auto"
    image_root: Optional[str] = None
    image_column: str = "image"
    caption_column: Optional[str] = None
    prompt_template: Optional[str] = None
    workers: int = 1
    device: str = "auto"
    num_parts: Optional[int] = None
    batch_size: int = 16
    strict: bool = False
    overwrite: bool = False
    encoder: Optional[str] = None
    encoder_aggregation: str = "cls"
    encoder_batch_size: int = 64
    tokenizer_profile: Optional[str] = None


class StrictModeError(RuntimeError):
    """--strict and some inputs were skipped; ``skipped`` maps reason -> count."""

    def __init__(self, skipped: Dict[str, int]) -> None:
        self.skipped = skipped
        reasons = ", ".join(f"{reason}: {count}" for reason, count in skipped.items())
        super().__init__(f"--strict: {sum(skipped.values())} inputs skipped ({reasons}); "
                         "fix the inputs or drop --strict")


@dataclass(frozen=True)
class PartSpec:
    """Part ``index`` covers input units [start, stop)."""

    index: int
    start: int
    stop: int


def plan_parts(num_units: int, num_parts: int) -> List[PartSpec]:
    """Contiguous, near-equal unit ranges; part order is input order."""
    return [PartSpec(i, i * num_units // num_parts, (i + 1) * num_units // num_parts) for i in range(num_parts)]


class OutputPaths:
    """File names of a dataset prefix and of its parts."""

    def __init__(self, prefix: str) -> None:
        self.prefix = str(prefix)
        self.bin, self.idx, self.manifest = f"{prefix}.bin", f"{prefix}.idx", manifest_path(prefix)
        self.images, self.image_sources = f"{prefix}.images.npy", f"{prefix}.images.sources.json"
        self.features = f"{prefix}.features.npy"
        self.parts_dir = Path(f"{prefix}.parts")
        self.plan = self.parts_dir / "plan.json"

    @staticmethod
    def part_name(index: int) -> str:
        """The part's file stem, also the name of its claim."""
        return f"part-{index:05d}"

    def part(self, index: int) -> str:
        return str(self.parts_dir / self.part_name(index))

    def outputs(self) -> List[str]:
        return [self.bin, self.idx, self.images, self.image_sources, self.features, self.manifest]


class TargetFeaturizer:
    """Precomputed ARRA targets: encoded image bytes -> f_GF rows, float16, NaN where undecodable.

    The path is the online one: ``make_image_preprocessor(encoder.spec)`` (DALI when
    installed) then ``TargetEncoder.encode``, so a precomputed row and an online target
    of the same bytes agree up to float16 rounding. ``num_missing`` counts NaN rows.
    """

    def __init__(self, encoder: TargetEncoder, batch_size: int, num_threads: int = 1) -> None:
        self.encoder = encoder
        self.batch_size = int(batch_size)
        dali_device = "gpu" if encoder.device.type == "cuda" else "cpu"
        if dali_device == "gpu" and encoder.device.index is not None:
            torch.cuda.set_device(encoder.device)  # DALI decodes on the current device: the encoder's
        self.preprocessor = make_image_preprocessor(encoder.spec, self.batch_size, device=dali_device,
                                                    num_threads=max(1, num_threads))
        self.num_missing = 0

    @classmethod
    def load(cls, spec: str, aggregation: str, batch_size: int, device: str = "cpu",
             num_threads: int = 1) -> "TargetFeaturizer":
        """``spec`` as ``--encoder`` takes it (``open_clip:local-dir:/path``, ``sam:/path``,
        ``timm:ARCH:/path/weights``, ``python:MODULE:FUNCTION``; ``encoders.load_encoder``)."""
        try:
            encoder = load_encoder(spec, aggregation, device=device)
        except (ValueError, FileNotFoundError) as error:
            raise type(error)(f"--encoder {spec} / --encoder-aggregation {aggregation}: {error}") from error
        return cls(encoder, batch_size, num_threads)

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def __call__(self, images: Sequence[bytes]) -> np.ndarray:
        """[len(images), D] float16 rows; batches of ``batch_size`` (batch boundaries are part of the result:
        callers that must reproduce a table byte for byte keep them the same)."""
        out = np.empty((len(images), self.dim), dtype=FEATURE_DTYPE)
        for start in range(0, len(images), self.batch_size):
            batch = self.preprocessor(list(images[start:start + self.batch_size]))
            rows = self.encoder.encode(batch.pixels).cpu().numpy()
            valid = batch.valid.cpu().numpy()
            rows[~valid] = np.nan
            self.num_missing += int((~valid).sum())
            out[start:start + len(rows)] = rows
            overflow = int((~np.isfinite(out[start:start + len(rows)][valid])).any(axis=1).sum())
            if overflow:
                logger.warning("%d f_GF rows overflow float16 (|x| > 65504) and hold inf", overflow)
        return out

    def feature_table(self, file_name: str, num_rows: int, num_missing: int) -> FeatureTable:
        """The manifest's record of a table of ``num_rows`` rows made by this featurizer."""
        return FeatureTable(file=file_name, num_rows=num_rows, dim=self.dim, encoder=self.encoder.identity,
                            aggregation=self.encoder.aggregation, preprocessing=self.encoder.spec.to_dict(),
                            samples_without_target=num_missing, dtype=FEATURE_DTYPE.name)


@dataclass
class _Worker:
    """What a process needs to build parts; built once per process."""

    source: InputSource
    text: Optional[TextTokenizer]
    image: ImageTokenizer
    profile: TokenizerProfile
    dtype: Type[np.number]
    max_seq_length: int
    batch_size: int
    features: Optional[TargetFeaturizer] = None


PART_FILES = (".bin", ".idx", ".images.npy", ".features.npy")


def _build_part(worker: _Worker, part: PartSpec, prefix: str, progress: Callable[[int], None]) -> Dict[str, Any]:
    """Tokenize the samples of one part into ``prefix.bin/.idx/.images.npy``, then write the marker ``prefix.json``.

    The files are written under a name of this call's own and renamed into place before
    the marker: two processes that ever build the same part leave one whole copy.
    """
    final, prefix = prefix, f"{prefix}.tmp-{uuid.uuid4().hex[:12]}"
    skipped: Counter = Counter()
    truncated = 0
    sources: Dict[str, int] = {}
    refs: List[tuple] = []
    pending: List[tuple] = []  # (condition ids, image ref, preprocessed pixels)
    feature_images: List[bytes] = []  # encoded bytes of kept samples awaiting f_GF
    feature_rows: List[np.ndarray] = []
    missing_before = worker.features.num_missing if worker.features else 0
    unreported = 0
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=worker.dtype)

    def flush() -> None:
        nonlocal truncated, unreported
        if pending:
            codes = worker.image.encode(torch.stack([pixels for _, _, pixels in pending])).numpy()
            for (condition, ref, _), sample_codes in zip(pending, codes):
                tokens, dropped = worker.profile.build_sequence(condition, sample_codes, worker.max_seq_length)
                truncated += dropped > 0
                builder.add_item(torch.from_numpy(tokens))
                builder.end_document()
                refs.append((sources.setdefault(ref.source, len(sources)), ref.offset, ref.length))
            pending.clear()
        progress(unreported)
        unreported = 0

    for sample in worker.source.read(part.start, part.stop):
        unreported += 1
        reason, caption, image = decode_sample(sample, needs_caption=worker.source.condition == "text")
        if reason is not None:
            skipped[reason] += 1
            continue
        if caption is not None:
            condition = worker.text.encode(caption)
        else:
            condition = [worker.profile.class_token(sample.class_id)]
        pending.append((condition, sample.ref, worker.image.preprocess(image)))
        if len(pending) >= worker.batch_size:
            flush()
        if worker.features is not None:
            feature_images.append(sample.image)
            if len(feature_images) >= worker.features.batch_size:
                feature_rows.append(worker.features(feature_images))
                feature_images.clear()
    flush()
    builder.finalize(f"{prefix}.idx")
    np.save(f"{prefix}.images.npy", np.array(refs, dtype=IMAGE_REF_DTYPE))
    marker = {"part": part.index, "start": part.start, "stop": part.stop, "num_samples": len(refs),
              "skipped": dict(sorted(skipped.items())), "text_truncated": truncated, "sources": list(sources)}
    if worker.features is not None:
        feature_rows.append(worker.features(feature_images))
        np.save(f"{prefix}.features.npy", np.concatenate(feature_rows))
        marker["samples_without_target"] = worker.features.num_missing - missing_before
    for suffix in PART_FILES:
        if os.path.exists(prefix + suffix):
            os.replace(prefix + suffix, final + suffix)
    write_json_atomic(f"{final}.json", marker)
    return marker


# Pool workers: one _Worker per process, set by _init_worker (spawned processes share nothing).
_PROCESS_WORKER: Optional[_Worker] = None
_PROGRESS_QUEUE: Any = None


def _init_worker(config: BuildConfig, source: InputSource, profile: TokenizerProfile,
                 device_queue: Any, progress_queue: Any) -> None:
    global _PROCESS_WORKER, _PROGRESS_QUEUE
    device = device_queue.get()
    if device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.workers))
    _PROGRESS_QUEUE = progress_queue
    _PROCESS_WORKER = _make_worker(config, source, profile, device)


def _build_part_in_pool(part: PartSpec, prefix: str) -> Dict[str, Any]:
    return _build_part(_PROCESS_WORKER, part, prefix, _PROGRESS_QUEUE.put)


def _make_worker(config: BuildConfig, source: InputSource, profile: TokenizerProfile, device: str) -> _Worker:
    text = TextTokenizer(config.text_tokenizer) if config.text_tokenizer else None
    image = ImageTokenizer(config.image_tokenizer, config.image_size, device=device)
    return _Worker(source, text, image, profile, DType.optimal_dtype(profile.vocab_size),
                   config.max_seq_length, config.batch_size, _make_featurizer(config, device))


def _make_featurizer(config: BuildConfig, device: str) -> Optional[TargetFeaturizer]:
    """The --encoder featurizer for a worker on ``device`` (DALI threads: this worker's share of the cores)."""
    if not config.encoder:
        return None
    threads = max(1, (os.cpu_count() or 1) // max(1, config.workers))
    return TargetFeaturizer.load(config.encoder, config.encoder_aggregation, config.encoder_batch_size, device,
                                 threads)


def _devices(config: BuildConfig, rank: BuildRank) -> List[str]:
    """One device per worker: GPUs round-robin when present, else CPU. Launched as one process
    per GPU (torchrun, srun), every worker of a process uses that process's GPU (LOCAL_RANK)."""
    workers = max(1, config.workers)
    if resolve_device(config.device) == "cpu":
        return ["cpu"] * workers
    if rank.world > 1:
        return [resolve_device("cuda", local_rank=rank.local_rank)] * workers
    return [f"cuda:{i % torch.cuda.device_count()}" for i in range(workers)]


def _run_parts(todo: Iterator[PartSpec], config: BuildConfig, paths: OutputPaths, in_process: _Worker,
               rank: BuildRank, on_part: Callable[[Dict[str, Any]], None], bar: tqdm) -> None:
    """Build the parts ``todo`` yields (claimed one at a time, as a worker is free): in this process
    for --workers 1, else in a spawned process pool."""
    devices = _devices(config, rank)
    finished = 0

    def finish(marker: Dict[str, Any]) -> None:
        nonlocal finished
        finished += 1
        on_part(marker)
        kill_after("ARRA_BUILD_FAIL_AFTER", finished, rank.rank)

    if config.workers <= 1:
        if devices[0] != "cpu":
            in_process = _make_worker(config, in_process.source, in_process.profile, devices[0])
        for part in todo:
            finish(_build_part(in_process, part, paths.part(part.index), bar.update))
        return
    context = mp.get_context("spawn")  # fork after torch/CUDA initialisation is unsafe
    device_queue, progress_queue = context.Queue(), context.Queue()
    for device in devices:
        device_queue.put(device)
    pool = ProcessPoolExecutor(config.workers, mp_context=context, initializer=_init_worker,
                               initargs=(config, in_process.source, in_process.profile, device_queue, progress_queue))
    try:
        futures = set()
        for part in todo:  # keep every worker busy, claiming a part only when one is free
            futures.add(pool.submit(_build_part_in_pool, part, paths.part(part.index)))
            while len(futures) >= config.workers:
                futures = _drain(futures, progress_queue, bar, finish)
        while futures:
            futures = _drain(futures, progress_queue, bar, finish)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _drain(futures: set, progress_queue: Any, bar: tqdm, finish: Callable[[Dict[str, Any]], None]) -> set:
    done, futures = wait(futures, timeout=0.5, return_when=FIRST_COMPLETED)
    while not progress_queue.empty():
        bar.update(progress_queue.get())
    for future in done:
        finish(future.result())  # re-raise a worker's error; finished parts stay for the rerun
    return futures


def _prepare_output(paths: OutputPaths, overwrite: bool) -> None:
    """Refuse to replace a finished dataset unless --overwrite; --overwrite also drops unfinished parts."""
    if os.path.exists(paths.manifest) and not overwrite:
        raise FileExistsError(f"{paths.manifest} holds a finished dataset; pass --overwrite to rebuild it "
                              "or choose another --output-prefix")
    if overwrite:
        for path in paths.outputs():
            if os.path.exists(path):
                os.remove(path)
        shutil.rmtree(paths.parts_dir, ignore_errors=True)
    paths.parts_dir.mkdir(parents=True, exist_ok=True)


def _check_plan(paths: OutputPaths, plan: Dict[str, Any]) -> None:
    """A resumed build must have the plan of the parts already on disk, else its result would mix two builds."""
    check_json_plan(paths.plan, plan, f"{paths.parts_dir} holds parts of a build with other settings or inputs; "
                                      "pass --overwrite to start over")


def _merge(parts: Sequence[PartSpec], markers: Sequence[Dict[str, Any]], paths: OutputPaths,
           dtype: Type[np.number], feature_dim: Optional[int]) -> None:
    """Concatenate the parts, in order, into the final token, image-reference and feature files."""
    builder = IndexedDatasetBuilder(paths.bin, dtype=dtype)
    sources: Dict[str, int] = {}
    refs = []
    for part, marker in zip(parts, markers):
        builder.add_index(paths.part(part.index))
        part_refs = np.load(f"{paths.part(part.index)}.images.npy")
        to_global = np.array([sources.setdefault(s, len(sources)) for s in marker["sources"]], dtype=np.int32)
        if len(part_refs):
            part_refs["source"] = to_global[part_refs["source"]]
        refs.append(part_refs)
    builder.finalize(paths.idx)
    np.save(paths.images, np.concatenate(refs) if refs else np.empty(0, IMAGE_REF_DTYPE))
    write_json_atomic(paths.image_sources, list(sources))
    if feature_dim is not None:
        num_rows = sum(m["num_samples"] for m in markers)
        table = np.lib.format.open_memmap(paths.features, mode="w+", dtype=FEATURE_DTYPE, shape=(num_rows, feature_dim))
        row = 0
        for part, marker in zip(parts, markers):
            part_rows = np.load(f"{paths.part(part.index)}.features.npy", mmap_mode="r")
            if part_rows.shape != (marker["num_samples"], feature_dim):
                raise ValueError(f"{paths.part(part.index)}.features.npy has shape {part_rows.shape}, expected "
                                 f"{(marker['num_samples'], feature_dim)}; pass --overwrite to rebuild")
            table[row:row + len(part_rows)] = part_rows
            row += len(part_rows)
        table.flush()
        del table


def format_summary(manifest: DatasetManifest, paths: OutputPaths, seconds: float) -> str:
    """A plain table for the end of a build: counts, skips by reason, output sizes, throughput."""
    counts = manifest.counts
    rows = [("samples written", counts.samples), ("text truncated", counts.text_truncated),
            ("skipped (total)", counts.skipped)]
    if manifest.features is not None:
        rows.append(("without ARRA target (NaN row)", manifest.features.samples_without_target))
    rows += [(f"  {reason}", count) for reason, count in manifest.skipped.items()]
    rows += [(os.path.basename(p), f"{os.path.getsize(p) / 2**20:.2f} MiB") for p in paths.outputs()
             if os.path.exists(p)]
    rows.append(("throughput", f"{counts.samples / max(seconds, 1e-9):.1f} samples/s over {seconds:.1f} s"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _new_profile(image, text, source, config: BuildConfig) -> TokenizerProfile:
    """The default vocabulary layout: image codes and new special tokens after the text vocabulary."""
    return TokenizerProfile.create(
        text_vocab_size=text.vocab_size if text else 0,
        text_special_ids=text.special_ids if text else {},
        num_classes=len(source.class_names),
        image_codebook_size=image.codebook_size,
        image_size=config.image_size,
        tokens_per_image=image.tokens_per_image,
        image_preprocessing=image.preprocessing,
        vq_model=image.identity,
        text_tokenizer=text.identity if text else None,
    )


def _given_profile(path: str, image, text, source) -> TokenizerProfile:
    """``--tokenizer-profile``: a model's own vocabulary layout (e.g. the ``tokenizer_profile.json`` that
    tools/convert_checkpoint.py writes beside an imported Chameleon), checked against the tokenizers."""
    flag = f"--tokenizer-profile {path}"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}: no such file")
    with open(path, encoding="utf-8") as f:
        profile = TokenizerProfile.from_dict(json.load(f))
    if profile.vq_model.sha256 != image.identity.sha256:
        raise ValueError(f"{flag} was made for the VQ model at {profile.vq_model.path}; --image-tokenizer is a "
                         "different model (content hash differs)")
    if (profile.image_size, profile.tokens_per_image) != (image.image_size, image.tokens_per_image):
        raise ValueError(f"{flag} expects --image-size {profile.image_size} ({profile.tokens_per_image} codes per "
                         f"image), not {image.image_size}")
    if source.class_names:
        raise ValueError(f"{flag}: class-folder input needs class tokens, which a model's own profile has none of")
    if text is not None and text.vocab_size > profile.vocab_size:
        raise ValueError(f"{flag}: --text-tokenizer has {text.vocab_size} ids, the profile's vocabulary only "
                         f"{profile.vocab_size}")
    return profile


def build_dataset(config: BuildConfig) -> Optional[DatasetManifest]:
    """Build (or resume) the dataset at ``config.output_prefix``; returns the manifest (None when another
    process of the same build finishes it).

    Raises FileExistsError for a finished prefix without --overwrite, ValueError for
    settings that cannot work (naming the flag), StrictModeError under --strict when
    any input was skipped (the parts stay, so a rerun without --strict only merges).
    """
    started = time.monotonic()
    paths = OutputPaths(config.output_prefix)
    source = open_source(config.input, config.input_kind, config.image_root, config.image_column,
                         config.caption_column, config.prompt_template)
    if config.prompt_template and source.kind not in ("csv", "jsonl"):
        raise ValueError(f"--prompt-template applies to csv/jsonl inputs, not to {source.kind}")
    if source.condition == "text" and not config.text_tokenizer:
        raise ValueError(f"--text-tokenizer is required for {source.kind} input (its condition is a caption)")
    text = TextTokenizer(config.text_tokenizer) if config.text_tokenizer else None
    image = ImageTokenizer(config.image_tokenizer, config.image_size)
    if config.tokenizer_profile:
        profile = _given_profile(config.tokenizer_profile, image, text, source)
    else:
        profile = _new_profile(image, text, source, config)
    if profile.condition_budget(config.max_seq_length) < 1:  # fail now, not in a worker
        need = config.max_seq_length + 1 - profile.condition_budget(config.max_seq_length)
        raise ValueError(f"--max-seq-length {config.max_seq_length} leaves no room for the condition (a class token "
                         f"or caption) beside {profile.tokens_per_image} image tokens and {NUM_FRAME_TOKENS} special "
                         f"tokens: every sample would lose it; use at least {need}")
    features = _make_featurizer(config, "cpu")
    dtype = DType.optimal_dtype(profile.vocab_size)
    default_parts = len(source.units) if source.kind == "tar" else math.ceil(len(source.units) / UNITS_PER_PART)
    parts = plan_parts(len(source.units), config.num_parts or max(1, default_parts))

    description = source.describe()
    rank = BuildRank.from_env()
    if rank.world > 1 and config.overwrite:
        raise ValueError(f"--overwrite with {rank.world} processes ({rank.launcher}): each would delete the "
                         f"others' parts; delete {paths.prefix}.* and {paths.parts_dir} first, or run the "
                         "--overwrite build as one process")
    if rank.world > 1 and os.path.exists(paths.manifest):
        finished = DatasetManifest.read(paths.prefix)
        if [finished.input, finished.tokenizer_profile.to_dict(), finished.max_seq_length] == \
                json.loads(json.dumps([description, profile.to_dict(), config.max_seq_length])):
            logger.info("%s: already finished by another process of this build", paths.prefix)
            return finished
    _prepare_output(paths, config.overwrite)
    _check_plan(paths, {"builder_version": BUILDER_VERSION, "input": description,
                        "tokenizer_profile": profile.to_dict(), "max_seq_length": config.max_seq_length,
                        "num_parts": len(parts), "batch_size": config.batch_size,
                        "features": None if features is None else {"encoder": features.encoder.identity,
                                                                   "batch_size": features.batch_size}})
    worker = _Worker(source, text, image, profile, dtype, config.max_seq_length, config.batch_size, features)
    try:
        with Claims(paths.parts_dir, rank) as claims:
            if not _build_claimed_parts(parts, config, paths, worker, rank, claims, source.kind == "tar", profile,
                                        dtype):
                return None
            if not claims.try_claim("merge"):
                logger.info("%s: every part is finished; another process is merging them (%s). If it died, "
                            "rerun this command once its claim is taken over.", paths.prefix, claims.describe("merge"))
                return None
            if os.path.exists(paths.manifest):  # merged by another process meanwhile
                return DatasetManifest.read(paths.prefix)
            manifest = _finish(parts, config, paths, dtype, features, description, profile)
            _remove_tree(paths.parts_dir)  # still holding the merge claim
    except FileNotFoundError:
        if not os.path.exists(paths.manifest):
            raise
        logger.info("%s: finished by another process of this build", paths.prefix)
        return DatasetManifest.read(paths.prefix)
    logger.info("built %s\n%s", paths.prefix, format_summary(manifest, paths, time.monotonic() - started))
    return manifest


def _remove_tree(directory: Path) -> None:
    """Rename, then delete: a process that looks into ``directory`` meanwhile finds it gone at once,
    instead of creating a claim in a half-deleted tree."""
    trash = directory.with_name(f"{directory.name}.removed-{uuid.uuid4().hex[:12]}")
    os.rename(directory, trash)
    shutil.rmtree(trash)


def _part_done(paths: OutputPaths, index: int) -> bool:
    return os.path.exists(f"{paths.part(index)}.json")


def _build_claimed_parts(parts: List[PartSpec], config: BuildConfig, paths: OutputPaths, worker: _Worker,
                         rank: BuildRank, claims: Claims, unknown_total: bool, profile: TokenizerProfile,
                         dtype) -> bool:
    """Build every part this process can claim; True when all parts are then finished (merge now)."""
    finished_before = sum(_part_done(paths, p.index) for p in parts)
    where = f" (rank {rank.rank} of {rank.world}, {rank.launcher})" if rank.world > 1 else ""
    logger.info("%s%s: %d parts (%d finished earlier), vocabulary %d (%s), %d tokens per image",
                config.output_prefix, where, len(parts), finished_before, profile.vocab_size,
                np.dtype(dtype).name, profile.tokens_per_image)
    by_name = {paths.part_name(p.index): p for p in parts}
    order = [paths.part_name(i) for i in rank.visiting_order([p.index for p in parts])]
    todo = (by_name[name] for name in unclaimed(claims, order, lambda name: _part_done(paths, by_name[name].index)))
    remaining = sum(p.stop - p.start for p in parts if not _part_done(paths, p.index))
    total = None if unknown_total or rank.world > 1 else remaining
    skipped: Counter = Counter()
    counted = {"at": 0.0, "done": finished_before, "samples": 0, "started": time.monotonic()}

    def on_part(marker: Dict[str, Any]) -> None:
        claims.release(paths.part_name(marker["part"]))
        skipped.update(marker["skipped"])
        counted["samples"] += marker["num_samples"] + sum(marker["skipped"].values())
        now = time.monotonic()
        if now - counted["at"] > 30 or rank.world == 1:  # a directory scan, at most every 30 s
            counted.update(at=now, done=sum(_part_done(paths, p.index) for p in parts))
        else:
            counted["done"] += 1
        bar.set_postfix(parts=f"{counted['done']}/{len(parts)}", skipped=sum(skipped.values()), refresh=False)
        if rank.world > 1:
            rate = counted["samples"] / max(time.monotonic() - counted["started"], 1e-9)
            logger.info("rank %d: part %d done; %d of %d parts finished, %.1f inputs/s here, %d inputs skipped "
                        "here so far", rank.rank, marker["part"], counted["done"], len(parts), rate,
                        sum(skipped.values()))

    with tqdm(total=total, unit="sample", desc="tokenizing", dynamic_ncols=True, disable=rank.rank > 0) as bar:
        _run_parts(todo, config, paths, worker, rank, on_part, bar)
    unfinished = [p.index for p in parts if not _part_done(paths, p.index)]
    if unfinished:
        holders = {i: (claims.holder(paths.part_name(i)) or {}).get("host", "?") for i in unfinished[:5]}
        logger.info("%s: %d of %d parts finished; the others are being built by other processes (part: host %s); "
                    "the one that finishes the last part merges. If a process died, rerun this command: it "
                    "builds what is missing and merges.", paths.prefix, len(parts) - len(unfinished), len(parts),
                    holders)
        return False
    return True


def _finish(parts: List[PartSpec], config: BuildConfig, paths: OutputPaths, dtype, features,
            description: Dict[str, Any], profile: TokenizerProfile) -> DatasetManifest:
    """Merge the finished parts and write the manifest (the dataset is then finished)."""
    markers = [json.loads(Path(f"{paths.part(p.index)}.json").read_text()) for p in parts]
    skipped: Counter = Counter()
    for marker in markers:
        skipped.update(marker["skipped"])
    skipped = dict(sorted(skipped.items()))
    if config.strict and skipped:
        raise StrictModeError(skipped)
    _merge(parts, markers, paths, dtype, None if features is None else features.dim)
    num_samples = sum(m["num_samples"] for m in markers)
    name = os.path.basename(paths.prefix)
    manifest = DatasetManifest(
        num_samples=num_samples, token_dtype=np.dtype(dtype).name, max_seq_length=config.max_seq_length,
        tokenizer_profile=profile, files=DatasetFiles.named(name),
        counts=BuildCounts(samples=num_samples, skipped=sum(skipped.values()),
                           text_truncated=sum(m["text_truncated"] for m in markers), parts=len(parts)),
        builder_version=BUILDER_VERSION, input=description, skipped=skipped,
        skip_reasons={reason: SKIP_REASONS[reason] for reason in skipped})
    if features is not None:
        manifest = manifest.with_features(features.feature_table(
            f"{name}.features.npy", num_samples, sum(m["samples_without_target"] for m in markers)))
    manifest.write(paths.prefix)  # last: marks the dataset finished
    return manifest


def add_features(prefix: str, encoder: str, aggregation: str = "cls", batch_size: int = 64, device: str = "cpu",
                 num_threads: int = 1, overwrite: bool = False,
                 batches_per_checkpoint: int = 16) -> Optional[DatasetManifest]:
    """Write (or with ``overwrite`` replace) ``PREFIX.features.npy`` of a finished dataset; returns the
    manifest (None when another process of the same run does the final write).

    Images are read through the image reference table (``read_image_bytes``) in sample
    order and go through the same ``TargetFeaturizer`` as ``--encoder`` at build time.
    The rows are computed in chunks of ``batches_per_checkpoint`` batches, each saved to
    ``PREFIX.features.npy.parts/chunk-NNNNN.npy`` with a marker: a rerun with the same encoder
    and batch size continues from there, and many processes (torchrun, srun, a SLURM
    array: build_ranks.py) share the chunks as the builder shares parts. Batch boundaries
    stay multiples of ``batch_size``, so the result is the same however it was computed.
    """
    paths = OutputPaths(prefix)
    if not os.path.isfile(paths.manifest):
        raise FileNotFoundError(f"{paths.manifest} not found: --data-prefix {prefix} is not a finished dataset "
                                "(build it with tools/build_indexed_dataset.py)")
    manifest = DatasetManifest.read(prefix)
    rank = BuildRank.from_env()
    if rank.world > 1 and overwrite:
        raise ValueError(f"--overwrite with {rank.world} processes ({rank.launcher}): a process starting after "
                         "the table is written would compute it again; run the --overwrite once as one process")
    table = ImageRefTable.load(prefix)
    num_rows = manifest.num_samples
    if len(table) != num_rows:
        raise ValueError(f"{paths.images} has {len(table)} rows but {paths.manifest} says {num_rows} samples")
    if rank.world > 1:  # one process per GPU
        device = resolve_device(device, local_rank=rank.local_rank)
    featurizer = TargetFeaturizer.load(encoder, aggregation, batch_size, device, num_threads)
    settings = json.loads(json.dumps({"encoder": featurizer.encoder.identity, "batch_size": featurizer.batch_size,
                                      "num_rows": num_rows}))  # as read back from JSON
    parts_dir = Path(f"{paths.features}.parts")
    manifest = DatasetManifest.read(prefix)  # again: loading the encoder took a while
    old = manifest.features
    if old and rank.world > 1 and not parts_dir.exists() and old.encoder == settings["encoder"] \
            and old.aggregation == aggregation:
        logger.info("%s: features already written by another process of this run", paths.features)
        return manifest
    if old and not overwrite:
        raise FileExistsError(f"{paths.manifest} already has features ({old.encoder.get('name')}, "
                              f"{old.aggregation}); pass --overwrite to replace them")
    chunk = _prepare_chunks(paths, parts_dir, settings, featurizer.batch_size * batches_per_checkpoint, rank)
    ranges = {f"chunk-{i:05d}": (begin, min(begin + chunk, num_rows))
              for i, begin in enumerate(range(0, num_rows, chunk))}
    done = lambda name: (parts_dir / f"{name}.json").is_file()  # noqa: E731
    try:
        with Claims(parts_dir, rank) as claims:
            names = list(ranges)
            order = [names[i] for i in rank.visiting_order(list(range(len(names))))]
            finished_before = sum(map(done, names))
            if finished_before:
                logger.info("%s: %d of %d chunks computed earlier", parts_dir, finished_before, len(names))
            with tqdm(total=num_rows, initial=sum(e - b for n, (b, e) in ranges.items() if done(n)), unit="image",
                      desc="f_GF", dynamic_ncols=True, disable=rank.rank > 0) as bar:
                for name in unclaimed(claims, order, done):
                    begin, end = ranges[name]
                    featurizer.num_missing = 0
                    rows = featurizer(read_image_bytes(table, range(begin, end)))
                    tmp = parts_dir / f"{name}.tmp-{uuid.uuid4().hex[:12]}.npy"
                    np.save(tmp, rows)
                    os.replace(tmp, parts_dir / f"{name}.npy")
                    write_json_atomic(parts_dir / f"{name}.json", {"rows": [begin, end],
                                                                   "samples_without_target": featurizer.num_missing})
                    claims.release(name)
                    bar.update(end - begin)
            if not all(map(done, names)):
                logger.info("%s: %d of %d chunks computed; the process that computes the last one writes the "
                            "table (if a process died, rerun this command)", parts_dir, sum(map(done, names)),
                            len(names))
                return None
            if not claims.try_claim("merge"):
                logger.info("%s: every chunk is computed; another process is writing the table (%s)", parts_dir,
                            claims.describe("merge"))
                return None
            current = DatasetManifest.read(prefix)
            if current.features != manifest.features:
                return current  # written by another process meanwhile
            return _write_feature_table(paths, manifest, featurizer, parts_dir, names)
    except FileNotFoundError:
        if parts_dir.exists() or DatasetManifest.read(prefix).features is None:
            raise
        logger.info("%s: written by another process of this run", paths.features)
        return DatasetManifest.read(prefix)


def _prepare_chunks(paths: OutputPaths, parts_dir: Path, settings: dict, chunk: int, rank: BuildRank) -> int:
    """Set up (or keep) ``parts_dir`` for ``settings``; returns the chunk size in rows. The processes
    take turns (the ``setup`` claim); the setup is idempotent, so the later ones only confirm it."""
    parts_dir.mkdir(exist_ok=True)
    plan_file = parts_dir / "plan.json"
    deadline = time.monotonic() + 3600
    with Claims(parts_dir, rank) as setup:
        while not setup.try_claim("setup"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{parts_dir}: waited an hour for {setup.describe('setup')}")
            time.sleep(0.5)
        previous = json.loads(plan_file.read_text()) if plan_file.is_file() else None
        if previous is not None and {k: v for k, v in previous.items() if k != "chunk_rows"} == settings:
            chunk = previous["chunk_rows"]  # a rerun keeps the chunking it started with
        elif previous is not None:
            logger.info("%s holds chunks of another encoder or batch size: starting over", parts_dir)
            for entry in parts_dir.iterdir():
                if entry.name.startswith("chunk-") or entry.name == "plan.json":
                    entry.unlink()
        _adopt_old_progress(paths, settings, parts_dir, chunk)
        write_json_atomic(plan_file, {**settings, "chunk_rows": chunk})
    return chunk


def _adopt_old_progress(paths: OutputPaths, settings: dict, parts_dir: Path, chunk: int) -> None:
    """Turn an interrupted run of the earlier single-file format (``PREFIX.features.npy.partial`` with
    ``PREFIX.features.progress.json``) into finished chunks, so its rows are not computed again."""
    partial, progress_file = Path(f"{paths.features}.partial"), Path(f"{paths.prefix}.features.progress.json")
    if not (partial.is_file() and progress_file.is_file()):
        return
    progress = json.loads(progress_file.read_text())
    if progress.get("settings") == settings:
        rows = np.load(partial, mmap_mode="r")
        done_rows, num_rows = int(progress["rows_done"]), int(settings["num_rows"])
        for i, begin in enumerate(range(0, done_rows, chunk)):
            end = min(begin + chunk, num_rows)
            if end > done_rows:
                break
            block = np.asarray(rows[begin:end])
            tmp = parts_dir / f"chunk-{i:05d}.tmp-{uuid.uuid4().hex[:12]}.npy"
            np.save(tmp, block)
            os.replace(tmp, parts_dir / f"chunk-{i:05d}.npy")
            write_json_atomic(parts_dir / f"chunk-{i:05d}.json", {
                "rows": [begin, end], "samples_without_target": int(np.isnan(block).any(axis=1).sum())})
        logger.info("%s: adopted %d rows computed by an earlier version", partial, done_rows)
    partial.unlink()
    progress_file.unlink()


def _write_feature_table(paths: OutputPaths, manifest: DatasetManifest, featurizer: TargetFeaturizer,
                         parts_dir: Path, names: List[str]) -> DatasetManifest:
    """Concatenate the chunks into ``PREFIX.features.npy`` and record it in the manifest."""
    num_rows = manifest.num_samples
    partial = f"{paths.features}.partial"
    table = np.lib.format.open_memmap(partial, mode="w+", dtype=FEATURE_DTYPE, shape=(num_rows, featurizer.dim))
    missing = 0
    for name in names:
        marker = json.loads((parts_dir / f"{name}.json").read_text())
        begin, end = marker["rows"]
        table[begin:end] = np.load(parts_dir / f"{name}.npy")
        missing += marker["samples_without_target"]
    table.flush()
    del table
    name = os.path.basename(paths.prefix)
    if manifest.features is not None:  # never a manifest naming a table that is being replaced
        manifest.with_features(None).write(paths.prefix)
    os.replace(partial, paths.features)
    manifest = manifest.with_features(featurizer.feature_table(f"{name}.features.npy", num_rows, missing))
    manifest.write(paths.prefix)
    _remove_tree(parts_dir)
    logger.info("wrote %s: %d x %d float16, %d samples without an ARRA target (NaN rows)", paths.features,
                num_rows, featurizer.dim, missing)
    return manifest
