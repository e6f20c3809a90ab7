#!/usr/bin/env python
"""Does ARRA make images better? A seeded, controlled study on real images, from one command.

    make study                                     # the full study (2-core CPU: a few hours)
    python tools/study.py --out study_out --quick  # the same pipeline in a few minutes (a test runs it)
    python tools/study.py --out study_gpu --device cuda --train-iters 20000 --layers 12 --hidden 512

Pipeline (every step through the project's real tools; a rerun skips finished steps):
1. images: Fashion-MNIST from Debian's dataset-fashion-mnist (or --data DIR with DIR/train/CLASS/*,
   DIR/test/CLASS/*), written as class folders; a validation split is carved out of train
   (every choice of settings is made on it, never on test); a data-limited subset of train.
2. tools/train_vq.py: a VQ tokenizer learned on the train split.
3. a domain classifier (train split) whose penultimate layer is one FID network; the other
   is an ImageNet network (--fid-nets); neither is the alignment encoder.
4. tools/build_indexed_dataset.py with --encoder: token datasets with precomputed f_GF;
   a shuffled-target control dataset: every sample paired with another sample's feature row.
5. examples/pretrain_arra.py (Megatron-LM's loop) per arm and seed: baseline (--no-arra), ARRA,
   shuffled control, identical data order and steps (same --seed), validation NLL logged on the
   held-out split (its --log-json).
6. tools/generate.py (CFG where there is a condition) and tools/evaluate.py: FID of the samples
   against the test split under each feature network, at several points of training.
7. report.md: tables (mean +- std over seeds, per-seed paired differences), FID floors,
   the cosine the dataset-mean / class-mean feature would score, plots, sample grids.

Exit status: 0 done, 2 bad flags or inputs.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STUDY_DIR = ROOT / "examples" / "study"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle_boot")
VARIANTS = ("baseline", "arra", "shuffled")
ARMS = ("cond", "uncond", "limited")
logger = logging.getLogger("study")


# ----------------------------------------------------------------------------------------- settings
@dataclass
class Scale:
    """How big the study is; --quick and the full default differ only here."""

    train_images: int            # 0: all of the train split (less the validation images)
    val_images: int
    test_images: int             # 0: all of the test split
    limited_images: int          # the data-limited arm's training set (a subset of train)
    vq_iters: int
    classifier_epochs: int
    train_iters: int
    limited_iters: int
    eval_interval: int
    fid_points: int              # FID at this many evenly spaced checkpoints (the last included)
    fid_samples: int
    floor_samples: int           # images per FID floor (as many as the samples: FID depends on N)
    seeds: int


FULL = Scale(train_images=20000, val_images=2000, test_images=0, limited_images=2000, vq_iters=800,
             classifier_epochs=3, train_iters=1000, limited_iters=1000, eval_interval=100, fid_points=1,
             fid_samples=2000, floor_samples=2000, seeds=3)
QUICK = Scale(train_images=600, val_images=128, test_images=300, limited_images=100, vq_iters=30,
              classifier_epochs=1, train_iters=20, limited_iters=20, eval_interval=10, fid_points=1,
              fid_samples=100, floor_samples=100, seeds=1)
# A small VQ for 28-32 px images (4x down-sampling, 7x7 codes): trains in minutes on 2 CPU cores.
VQ_FLAGS = "--base-channels 32 --num-res-blocks 1 --latent-channels 32 --codebook-dim 8 --batch-size 64 --lr 1e-3"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="study directory (a rerun continues it)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: the whole pipeline in a few minutes")
    p.add_argument("--data", default="fashion-mnist",
                   help="'fashion-mnist' (Debian dataset-fashion-mnist) or a class-folder root with train/ and test/ "
                        "(and optionally val/)")
    p.add_argument("--image-size", type=int, default=28, help="side of the images the VQ model sees")
    p.add_argument("--encoder", default="python:arra_study_nets:efficientnet_lite0",
                   help="the frozen alignment encoder (any --encoder spec of build_indexed_dataset.py); "
                        "examples/study is on PYTHONPATH")
    p.add_argument("--encoder-aggregation", default="avgpool")
    p.add_argument("--fid-nets", nargs="+", default=["classifier", "python:arra_study_nets:mobilenetv2_imagenet_128"],
                   help="FID feature networks: 'classifier' (trained here on the train split) and/or any "
                        "--fid-feature-net spec of tools/evaluate.py")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS),
                   help="cond: class-conditional; uncond: unconditional; limited: class-conditional on "
                        "--limited-images training images")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--seeds", type=int, help="seeds per arm and variant (default 3; --quick 2)")
    p.add_argument("--train-iters", type=int)
    p.add_argument("--limited-iters", type=int)
    p.add_argument("--limited-images", type=int)
    p.add_argument("--eval-interval", type=int)
    p.add_argument("--fid-samples", type=int, help="samples per FID (the floors use as many images)")
    p.add_argument("--fid-points", type=int, help="FID at this many evenly spaced checkpoints")
    p.add_argument("--train-images", type=int, help="training images (0: the whole train split)")
    p.add_argument("--vq-iters", type=int)
    g = p.add_argument_group("model (a LlamaGen-style decoder) and training")
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--hidden", type=int, default=128)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=64)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--dropout", type=float, default=0.0)
    g.add_argument("--codebook-size", type=int, default=512)
    g.add_argument("--vq-flags", default=VQ_FLAGS, help="tools/train_vq.py model and optimiser flags (4x "
                                                        "down-sampling is fixed)")
    g.add_argument("--condition-dropout-prob", type=float, default=0.1,
                   help="conditional arms (for CFG): the loop's --arra-condition-dropout-prob")
    g = p.add_argument_group("ARRA (the paper's space; choose on the validation split)")
    g.add_argument("--arra-align-layer", type=int, default=1)
    g.add_argument("--arra-weight", type=float, default=1.0)
    g.add_argument("--arra-objective", default="cos", choices=["cos", "mse"])
    g.add_argument("--arra-projector", default="mlp", choices=["mlp", "pool"])
    g = p.add_argument_group("sampling")
    g.add_argument("--cfg-scale", type=float, default=1.5, help="conditional arms")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--temperature", type=float, default=1.0)
    g = p.add_argument_group("machine")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    g.add_argument("--jobs", type=int, default=2, help="runs trained at once (CPU: one per core)")
    g.add_argument("--threads", type=int, default=1, help="torch threads per run")
    return p


def scale_of(args: argparse.Namespace) -> Scale:
    scale = Scale(**asdict(QUICK if args.quick else FULL))
    for name in ("seeds", "train_iters", "limited_iters", "limited_images", "eval_interval", "fid_samples",
                 "fid_points", "train_images", "vq_iters"):
        if getattr(args, name) is not None:
            setattr(scale, name, getattr(args, name))
    scale.floor_samples = scale.fid_samples
    return scale


# ------------------------------------------------------------------------------------- utilities
def env(args: argparse.Namespace) -> Dict[str, str]:
    paths = [str(STUDY_DIR), str(Path(args.out).resolve() / "nets"), os.environ.get("PYTHONPATH", "")]
    out = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads)}
    if args.device == "cpu":
        out["ARRA_CPU_MODE"] = "1"
        out["CUDA_VISIBLE_DEVICES"] = ""
    return out


def run(cmd: Sequence, args: argparse.Namespace, log: Optional[Path] = None) -> None:
    """Run one of the project's tools; its output goes to ``log`` (kept) and a failure names it."""
    cmd = [str(c) for c in cmd]
    logger.info("+ %s", " ".join(cmd))
    if log is None:
        subprocess.run(cmd, check=True, cwd=ROOT, env=env(args))
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env(args), stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(True)[-30:])
        raise RuntimeError(f"{cmd[1]} failed with exit {proc.returncode}; its log {log} ends:\n{tail}")


def done(path: Path) -> bool:
    return (path / ".done").is_file() if path.is_dir() else path.is_file()


def mark(path: Path, info: Optional[dict] = None) -> None:
    global MARKS
    path.mkdir(parents=True, exist_ok=True)
    (path / ".done").write_text(json.dumps(info or {}, indent=1))
    MARKS += 1


def stage(name: str):
    """Log a stage; when it did work (finished something, see ``mark``), store its wall time in
    OUT/stage_times.json, so the report gives each stage's time from the invocation that ran it,
    not the near-zero time of a rerun that found it done."""
    def wrap(fn):
        def inner(*a, **k):
            started, marks = time.perf_counter(), MARKS
            logger.info("=== %s", name)
            result = fn(*a, **k)
            if MARKS > marks and TIMES_FILE is not None:
                times = json.loads(TIMES_FILE.read_text()) if TIMES_FILE.is_file() else {}
                times[name] = time.perf_counter() - started
                TIMES_FILE.write_text(json.dumps(times, indent=1))
            return result
        return inner
    return wrap


MARKS = 0                            # stages finished by this invocation (mark() calls)
TIMES_FILE: Optional[Path] = None    # OUT/stage_times.json, set by main()


# ----------------------------------------------------------------------------------- 1. images
def _idx(path: Path) -> np.ndarray:
    """An idx-ubyte(.gz) file (MNIST's format): big-endian dims after a magic number."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _write_folder(root: Path, images: np.ndarray, labels: np.ndarray, names: Sequence[str], ids: np.ndarray) -> None:
    from PIL import Image

    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i, image, label in zip(ids, images, labels):
        Image.fromarray(image, mode="L").save(root / names[label] / f"{i:05d}.png")


def _read_folder(root: Path) -> Tuple[List[Path], np.ndarray, List[str]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.is_file():
                files.append(f)
                labels.append(c)
    return files, np.asarray(labels), classes


def _subset(n: int, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """n indices, as many per class as the classes allow (stratified), in a fixed random order."""
    if n <= 0 or n >= len(labels):
        return np.arange(len(labels))
    classes = np.unique(labels)
    per = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    take = [p[: n // len(classes) + (i < n % len(classes))] for i, p in enumerate(per)]
    return np.sort(np.concatenate(take))


@stage("images")
def prepare_images(args, scale: Scale, out: Path) -> Dict[str, Path]:
    """DIR/{train,val,test,limited}/CLASS/*.png; val carved out of train with a fixed seed."""
    splits = {s: out / "images" / s for s in ("train", "val", "test", "limited")}
    if all(done(p) for p in splits.values()):
        return splits
    shutil.rmtree(out / "images", ignore_errors=True)
    rng = np.random.default_rng(0)
    if args.data == "fashion-mnist":
        if not FASHION_MNIST.is_dir():
            raise FileNotFoundError(f"{FASHION_MNIST}: not found; install Debian's dataset-fashion-mnist "
                                    "(apt-get install dataset-fashion-mnist) or pass --data DIR")
        x = _idx(FASHION_MNIST / "train-images-idx3-ubyte.gz")
        y = _idx(FASHION_MNIST / "train-labels-idx1-ubyte.gz")
        tx = _idx(FASHION_MNIST / "t10k-images-idx3-ubyte.gz")
        ty = _idx(FASHION_MNIST / "t10k-labels-idx1-ubyte.gz")
        names = [f"{i}_{n}" for i, n in enumerate(FASHION_CLASSES)]
        val = _subset(scale.val_images, y, rng)
        rest = np.setdiff1d(np.arange(len(y)), val)
        train = rest[_subset(scale.train_images, y[rest], rng)]
        test = _subset(scale.test_images, ty, rng)
        limited = train[_subset(scale.limited_images, y[train], rng)]
        for split, images, labels, ids in (("train", x, y, train), ("val", x, y, val), ("test", tx, ty, test),
                                           ("limited", x, y, limited)):
            _write_folder(splits[split], images[ids], labels[ids], names, ids)
    else:
        _link_folder_splits(Path(args.data), splits, scale, rng)
    for split, path in splits.items():
        mark(path, {"images": sum(1 for _ in path.rglob("*.png")) if path.exists() else 0})
    return splits


def _link_folder_splits(data: Path, splits: Dict[str, Path], scale: Scale, rng: np.random.Generator) -> None:
    """A user's class-folder dataset: symlinks into the study's split folders."""
    for split in ("train", "test"):
        if not (data / split).is_dir():
            raise FileNotFoundError(f"--data {data}: expected {data}/{split}/CLASS/IMAGE folders")
    files, labels, classes = _read_folder(data / "train")
    if (data / "val").is_dir():
        val_files, val_labels, _ = _read_folder(data / "val")
        train = np.arange(len(files))
    else:
        val = _subset(scale.val_images, labels, rng)
        val_files, val_labels = [files[i] for i in val], labels[val]
        train = np.setdiff1d(np.arange(len(files)), val)
    train = train[_subset(scale.train_images, labels[train], rng)]
    test_files, test_labels, _ = _read_folder(data / "test")
    test = _subset(scale.test_images, test_labels, rng)
    limited = train[_subset(scale.limited_images, labels[train], rng)]
    chosen = {"train": [(files[i], labels[i]) for i in train], "val": list(zip(val_files, val_labels)),
              "test": [(test_files[i], test_labels[i]) for i in test],
              "limited": [(files[i], labels[i]) for i in limited]}
    for split, items in chosen.items():
        for f, label in items:
            target = splits[split] / classes[label] / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(f.resolve())


def _load_split(folder: Path, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Grey uint8 [N, S, S] and labels of a class-folder split (for the classifier)."""
    from PIL import Image

    files, labels, _ = _read_folder(folder)
    images = np.stack([np.asarray(Image.open(f).convert("L").resize((size, size), Image.Resampling.BICUBIC))
                       for f in files])
    return images, labels


# ------------------------------------------------------------------------- 2-4. models, datasets
@stage("vq tokenizer")
def train_vq(args, scale: Scale, out: Path, splits: Dict[str, Path]) -> Path:
    vq = out / "vq"
    if not (vq / "config.json").is_file() or not (vq / "train_vq.json").is_file():
        run([sys.executable, "tools/train_vq.py", "--input", splits["train"], "--output", vq,
             "--image-size", args.image_size, "--iters", scale.vq_iters, "--codebook-size", args.codebook_size,
             "--channel-multiplier", 1, 1, 2, *args.vq_flags.split(),
             "--device", args.device, "--seed", 0], args, out / "logs" / "train_vq.log")
    return vq


@stage("classifier")
def train_classifier(args, scale: Scale, out: Path, splits: Dict[str, Path]) -> Dict[str, float]:
    import study_classifier  # examples/study, on sys.path (see main)

    weights = out / "nets" / "classifier.pt"
    report = out / "nets" / "classifier.json"
    if not report.is_file():
        x, y = _load_split(splits["train"], args.image_size)
        tx, ty = _load_split(splits["test"], args.image_size)
        info = study_classifier.train(x, y, tx, ty, weights, epochs=scale.classifier_epochs)
        report.write_text(json.dumps(info, indent=1))
    study_classifier.write_spec_module(out / "nets", weights)
    return json.loads(report.read_text())


@stage("datasets")
def build_datasets(args, scale: Scale, out: Path, splits: Dict[str, Path], vq: Path) -> Dict[str, str]:
    """Token datasets with precomputed targets, plus the shuffled-target controls."""
    prefixes = {}
    for split in ("train", "val", "limited"):
        prefix = out / "data" / split
        if not Path(f"{prefix}.json").is_file():
            run([sys.executable, "tools/build_indexed_dataset.py", "--input", splits[split], "--input-kind", "folder",
                 "--output-prefix", prefix, "--image-tokenizer", vq, "--image-size", args.image_size,
                 "--max-seq-length", tokens_per_sample(args), "--encoder", args.encoder,
                 "--encoder-aggregation", args.encoder_aggregation, "--workers", 1 if args.quick else args.jobs,
                 "--device", args.device,
                 "--overwrite"], args, out / "logs" / f"build_{split}.log")
        prefixes[split] = str(prefix)
    for split in ("train", "limited"):
        prefixes[f"{split}_shuffled"] = shuffled_control(prefixes[split])
    return prefixes


def tokens_per_sample(args) -> int:
    """[BOS] class [BOI] codes [EOI] [EOS] with 4x down-sampling (the study's VQ depth)."""
    return 5 + (args.image_size // 4) ** 2


def shuffled_control(prefix: str, seed: int = 0) -> str:
    """``PREFIX-shuffled``: the same documents, every sample paired with *another* sample's f_GF row.

    The permutation is one cycle over a random order (no sample keeps its own row). The token
    files are symlinks; only the feature table and the manifest are new."""
    import dataclasses

    from arra_megatron.data.manifest import DatasetFiles, DatasetManifest

    control = f"{prefix}-shuffled"
    if Path(f"{control}.json").is_file():
        return control
    manifest = DatasetManifest.read(prefix)
    features = np.load(f"{prefix}.features.npy")
    order = np.random.default_rng(seed).permutation(len(features))
    source = np.empty_like(order)
    source[order] = np.roll(order, 1)  # sample order[i] takes the row of order[i - 1]
    assert not np.any(source == np.arange(len(source)))
    name = Path(control).name
    np.save(f"{control}.features.npy", features[source])
    for ext in (".bin", ".idx", ".images.npy", ".images.sources.json"):
        link = Path(f"{control}{ext}")
        if Path(f"{prefix}{ext}").exists() and not link.exists():
            link.symlink_to(Path(f"{prefix}{ext}").name)
    table = dataclasses.replace(manifest.features, file=f"{name}.features.npy")
    files = dataclasses.replace(DatasetFiles.named(name), features=table.file)
    dataclasses.replace(manifest, files=files, features=table, control={
        "kind": "shuffled targets", "source": Path(prefix).name, "seed": seed,
        "rule": "row of sample order[i] = row of order[i-1], order = permutation(seed)"}).write(control)
    return control


# --------------------------------------------------------------------------------- 5. training
@dataclass(frozen=True)
class RunSpec:
    arm: str
    variant: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.arm}-{self.variant}-s{self.seed}"


def model_config(args, out: Path) -> Path:
    """The study's decoder as a --config YAML of pretrain_arra.py (examples/configs style)."""
    import yaml

    seq = tokens_per_sample(args) - 1
    config = {
        "num-layers": args.layers, "hidden-size": args.hidden, "num-attention-heads": args.heads,
        "ffn-hidden-size": 3 * args.hidden, "normalization": "RMSNorm", "swiglu": True,
        "disable-bias-linear": True, "position-embedding-type": "rope",
        "untie-embeddings-and-output-weights": True, "hidden-dropout": args.dropout,
        "attention-dropout": args.dropout, "seq-length": seq, "max-position-embeddings": seq,
        "micro-batch-size": args.global_batch_size, "global-batch-size": args.global_batch_size,
        "num-workers": 0, "lr": args.lr, "min-lr": args.lr / 10, "lr-decay-style": "cosine",
        "weight-decay": 0.05, "adam-beta1": 0.9, "adam-beta2": 0.95, "clip-grad": 1.0,
        "log-interval": 50, "arra-align-layer": args.arra_align_layer, "arra-objective": args.arra_objective,
        "arra-projector": args.arra_projector, "arra-target": "hybnext",
    }
    path = out / "model.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def train_run(spec: RunSpec, args, scale: Scale, out: Path, prefixes: Dict[str, str], config: Path,
              feature_dim: int) -> Path:
    run_dir = out / "runs" / spec.name
    limited = spec.arm == "limited"
    train = prefixes["limited" if limited else "train"] + ("-shuffled" if spec.variant == "shuffled" else "")
    iters = scale.limited_iters if limited else scale.train_iters
    from arra_megatron.data.manifest import DatasetManifest

    val_images = DatasetManifest.read(prefixes["val"]).num_samples
    eval_iters = max(1, val_images // args.global_batch_size)
    save_every = fid_iterations(scale, iters)[0]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", 1, "--max-restarts", 0,
           "--master-port", _free_port(),
           "examples/pretrain_arra.py", "--config", config, "--train-data-path", train, "--valid-data-path",
           prefixes["val"], "--seed", 1000 + spec.seed, "--train-iters", iters,
           "--lr-warmup-iters", max(1, iters // 20), "--eval-interval", scale.eval_interval,
           "--eval-iters", eval_iters,
           # The baseline is the plain GPT objective: no projector at all (a lambda-0 projector would
           # still cost its forward and backward). The projector draws from its own generator, so the
           # decoder's initialisation and data order are those of the ARRA runs with the same seed.
           *(["--no-arra"] if spec.variant == "baseline" else
             ["--arra-target-dim", feature_dim, "--arra-weight", args.arra_weight]),
           "--arra-condition-dropout-prob", 1.0 if spec.arm == "uncond" else args.condition_dropout_prob,
           "--save", run_dir / "ckpt", "--save-interval", save_every, "--log-json", run_dir / "log.jsonl"]
    if args.device == "cuda":
        cmd += ["--bf16"]
    what = " ".join(str(c) for c in cmd[cmd.index("--config"):]) + "\n" + config.read_text()
    if done(run_dir / "trained"):
        if json.loads((run_dir / "trained" / ".done").read_text()).get("command") == what:
            return run_dir
        logger.info("%s: settings changed since it was trained; training it again", spec.name)
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.perf_counter()
    run(cmd, args, run_dir / "train.log")
    mark(run_dir / "trained", {"seconds": time.perf_counter() - started, "train_data": train, "command": what})
    return run_dir


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fid_iterations(scale: Scale, iters: int) -> List[int]:
    step = iters // scale.fid_points
    return [step * (i + 1) for i in range(scale.fid_points - 1)] + [iters]


# ------------------------------------------------------------------------ 6. sampling, metrics
def samples_dir(run_dir: Path, iteration: int, scale: Scale) -> Path:
    """The samples of one checkpoint, keyed by their number (a FID depends on it): another
    --fid-samples gets its own directory, FID reports and floors."""
    return run_dir / f"samples_{iteration:07d}_n{scale.fid_samples}"


def fid_report(run_dir: Path, net: str, iteration: int, scale: Scale) -> Path:
    return run_dir / f"fid_{net}_{iteration:07d}_n{scale.fid_samples}.json"


def migrate_unkeyed(out: Path) -> None:
    """Give sample directories, FID reports and floors of earlier versions (named without the sample
    count) the count they were made with, so a rerun finds them."""
    for samples in sorted(out.glob("runs/*/samples_???????")):
        if not (samples / "samples.jsonl").is_file():
            continue
        n = sum(1 for _ in open(samples / "samples.jsonl", encoding="utf-8"))
        iteration = samples.name.split("_")[1]
        for report in samples.parent.glob(f"fid_*_{iteration}.json"):
            report.rename(report.with_name(f"{report.stem}_n{n}.json"))
        samples.rename(samples.with_name(f"{samples.name}_n{n}"))
    for folder in ("real_train", "vq_recon"):
        path = out / "floors" / folder
        if path.is_dir():
            n = sum(1 for _ in path.rglob("*.png"))
            for report in (out / "floors").glob(f"*_{folder}.json"):
                report.rename(report.with_name(f"{report.stem}_n{n}.json"))
            path.rename(path.with_name(f"{folder}_n{n}"))


def sample_and_score(spec: RunSpec, run_dir: Path, args, scale: Scale, nets: Dict[str, str],
                     refs: Dict[str, Path], num_classes: int) -> None:
    iters = scale.limited_iters if spec.arm == "limited" else scale.train_iters
    for iteration in fid_iterations(scale, iters):
        samples = samples_dir(run_dir, iteration, scale)
        if not (samples / "samples.jsonl").is_file():  # new, or cut short: generate.py continues it
            if spec.arm == "uncond":
                what = ["--unconditional", "--num-samples", scale.fid_samples]
            else:
                per_class = math.ceil(scale.fid_samples / num_classes)
                what = ["--class-ids", *range(num_classes), "--num-samples", per_class, "--cfg-scale", args.cfg_scale]
            run([sys.executable, "tools/generate.py", "--load", run_dir / "ckpt" / f"iter_{iteration:07d}", *what,
                 "--top-k", args.top_k, "--temperature", args.temperature, "--seed", 10_000 * spec.seed,
                 "--micro-batch-size", 500, "--grid-nrow", 10, "--out-dir", samples], args,
                run_dir / "sample.log")
        for net, net_spec in nets.items():
            report = fid_report(run_dir, net, iteration, scale)
            if not report.is_file():
                score_fid(samples, refs[net], net_spec, report, args, run_dir / "fid.log")


def score_fid(generated: Path, ref: Path, net_spec: str, report: Path, args, log: Path) -> None:
    run([sys.executable, "tools/evaluate.py", "--generated", generated, "--ref", ref, "--metrics", "fid",
         "--fid-feature-net", net_spec, "--device", args.device, "--batch-size", 250, "--no-progress",
         "--output", report], args, log)


@stage("FID references and floors")
def references(args, scale: Scale, out: Path, splits: Dict[str, Path], nets: Dict[str, str], vq: Path):
    """Test-split statistics per FID network, and the floors: real train images vs test, VQ
    reconstructions of train images vs test (no generator can beat its tokenizer)."""
    refs, floors = {}, {}
    n = scale.floor_samples
    floor_dirs = {"real train": out / "floors" / f"real_train_n{n}", "VQ reconstruction": out / "floors" / f"vq_recon_n{n}"}
    if not done(floor_dirs["VQ reconstruction"]):
        write_floor_images(splits["train"], floor_dirs, vq, args.image_size, scale.floor_samples)
    for net, net_spec in nets.items():
        refs[net] = out / "refs" / f"test_{net}.npz"
        if not refs[net].is_file():
            refs[net].parent.mkdir(parents=True, exist_ok=True)
            run([sys.executable, "tools/evaluate.py", "--ref", splits["test"], "--save-ref-stats", refs[net],
                 "--fid-feature-net", net_spec, "--device", args.device, "--batch-size", 250, "--no-progress"],
                args, out / "logs" / "refs.log")
        for floor, folder in floor_dirs.items():
            report = out / "floors" / f"{net}_{folder.name}.json"
            if not report.is_file():
                score_fid(folder, refs[net], net_spec, report, args, out / "logs" / "floors.log")
            floors[(net, floor)] = json.loads(report.read_text())["metrics"]["fid"]
    return refs, floors


def write_floor_images(train: Path, dirs: Dict[str, Path], vq: Path, image_size: int, count: int) -> None:
    """``count`` train images as the generator's output format (RGB PNG at the VQ size), and
    their VQ reconstructions (encode + decode with the study's tokenizer)."""
    import torch
    from PIL import Image

    from arra_megatron.inference.output import to_unit_range
    from arra_megatron.tokenization.image import ImageTokenizer

    files, labels, _ = _read_folder(train)
    pick = _subset(count, labels, np.random.default_rng(1))
    tokenizer = ImageTokenizer(vq, image_size)
    for d in dirs.values():
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    for start in range(0, len(pick), 500):
        batch = [Image.open(files[i]).convert("RGB") for i in pick[start:start + 500]]
        pixels = torch.stack([tokenizer.preprocess(image) for image in batch])
        recon = tokenizer.decode(tokenizer.encode(pixels))
        for j, (real, rec) in enumerate(zip(pixels, recon)):
            for d, img in ((dirs["real train"], real), (dirs["VQ reconstruction"], rec)):
                array = (to_unit_range(img[None])[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                Image.fromarray(array).save(d / f"{start + j:06d}.png")
    for d in dirs.values():
        mark(d)


def feature_baselines(prefixes: Dict[str, str], splits: Dict[str, Path]) -> Dict[str, float]:
    """The gva cos that no image-specific knowledge needs: predicting the train set's mean f_GF,
    or its class's mean f_GF, for every validation image (cosine averaged over images)."""
    from arra_megatron.data.manifest import DatasetManifest

    def load(prefix, folder):
        # The builder reads a class-folder tree in (class, file) order: row i is the i-th file.
        manifest = DatasetManifest.read(prefix)
        _, classes, _ = _read_folder(folder)
        if manifest.counts.skipped or manifest.num_samples != len(classes):
            raise ValueError(f"{prefix}: {manifest.counts.skipped} inputs skipped; cannot pair rows with classes")
        return np.load(f"{prefix}.features.npy").astype(np.float64), classes

    train, train_cls = load(prefixes["train"], splits["train"])
    val, val_cls = load(prefixes["val"], splits["val"])

    def cos(a, b):
        return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))

    mean = train.mean(0, keepdims=True)
    class_means = np.stack([train[train_cls == c].mean(0) for c in range(int(train_cls.max()) + 1)])
    return {"dataset-mean feature": cos(val, np.repeat(mean, len(val), 0)),
            "class-mean feature": cos(val, class_means[val_cls])}


# ---------------------------------------------------------------------------------- 7. report
def collect(specs: List[RunSpec], out: Path, scale: Scale, nets: Dict[str, str]) -> Dict[RunSpec, dict]:
    from arra_megatron.evaluation.runs import read_metrics_log

    results = {}
    for spec in specs:
        run_dir = out / "runs" / spec.name
        log = read_metrics_log(run_dir / "log.jsonl", spec.name)
        iters = scale.limited_iters if spec.arm == "limited" else scale.train_iters
        fids = {net: {it: json.loads(fid_report(run_dir, net, it, scale).read_text())["metrics"]["fid"]
                      for it in fid_iterations(scale, iters)} for net in nets}
        val_its, val_nll = log.valid.get("lm_loss", ([], []))
        cos_its, val_cos = log.valid.get("gva_cos", ([], []))
        results[spec] = {"val_its": val_its, "val_nll": val_nll, "val_cos": val_cos, "fid": fids,
                         "final_nll": val_nll[-1], "best_nll": min(val_nll), "final_cos": val_cos[-1] if val_cos else
                         float("nan"), "seconds": json.loads((run_dir / "trained" / ".done").read_text())["seconds"]}
    return results


def _mean_std(values: Sequence[float]) -> str:
    values = np.asarray(values, dtype=np.float64)
    return f"{values.mean():.4g} ± {values.std(ddof=1) if len(values) > 1 else 0:.2g}"


def write_report(args, scale: Scale, out: Path, specs: List[RunSpec], results: Dict[RunSpec, dict],
                 floors: Dict, baselines: Dict[str, float], classifier: Dict[str, float],
                 vq_report: dict, nets: Dict[str, str]) -> Path:
    arms = [a for a in ARMS if any(s.arm == a for s in specs)]
    variants = [v for v in VARIANTS if any(s.variant == v for s in specs)]
    seeds = sorted({s.seed for s in specs})
    lines = ["# ARRA study", "", f"Command: `python tools/study.py {' '.join(sys.argv[1:])}`", "",
             f"Data: {args.data}; encoder `{args.encoder}` ({args.encoder_aggregation}); "
             f"decoder {args.layers} layers x {args.hidden}; ARRA k={args.arra_align_layer}, "
             f"lambda={args.arra_weight}, {args.arra_objective}, {args.arra_projector} projector; "
             f"{scale.train_iters} iterations of batch {args.global_batch_size} "
             f"({scale.limited_iters} on {scale.limited_images} images in the limited arm); "
             f"{scale.fid_samples} samples per FID; {len(seeds)} seeds; CFG {args.cfg_scale} on conditional arms.", "",
             "Validation NLL is the training loop's lm loss on the held-out validation split (nats per counted "
             "token: the image tokens and EOI). FID is against the test split. Nothing was chosen on the test split.",
             ""]
    fid_cols = [f"FID {net}" for net in nets]
    lines += ["## Results (mean ± std over seeds, final checkpoint)", "",
              "| arm | variant | n | val NLL (final) | val NLL (best) | " + " | ".join(fid_cols) + " | val gva cos |",
              "|---|---|---|---|---|" + "---|" * len(fid_cols) + "---|"]
    for arm in arms:
        for variant in variants:
            rs = [results[RunSpec(arm, variant, s)] for s in seeds]
            fids = [_mean_std([r["fid"][net][max(r["fid"][net])] for r in rs]) for net in nets]
            cos = _mean_std([r["final_cos"] for r in rs]) if variant != "baseline" else "–"
            lines.append(f"| {arm} | {variant} | {len(rs)} | {_mean_std([r['final_nll'] for r in rs])} | "
                         f"{_mean_std([r['best_nll'] for r in rs])} | " + " | ".join(fids) + f" | {cos} |")
    lines += ["", "## Paired differences to the baseline (same seed, same data order)", "",
              "| arm | variant | per-seed Δ val NLL | " + " | ".join(f"per-seed Δ {c}" for c in fid_cols) + " |",
              "|---|---|---|" + "---|" * len(fid_cols)]
    for arm in arms:
        for variant in [v for v in variants if v != "baseline"]:
            if "baseline" not in variants:
                continue
            pairs = [(results[RunSpec(arm, variant, s)], results[RunSpec(arm, "baseline", s)]) for s in seeds]
            nll = ", ".join(f"{a['final_nll'] - b['final_nll']:+.4f}" for a, b in pairs)
            fid = [", ".join(f"{a['fid'][n][max(a['fid'][n])] - b['fid'][n][max(b['fid'][n])]:+.2f}" for a, b in pairs)
                   for n in nets]
            lines.append(f"| {arm} | {variant} | {nll} | " + " | ".join(fid) + " |")
    lines += ["", "## Floors and references", "",
              "| FID network | real train vs test | VQ reconstructions vs test |", "|---|---|---|"]
    for net in nets:
        lines.append(f"| {net} | {floors[(net, 'real train')]:.2f} | {floors[(net, 'VQ reconstruction')]:.2f} |")
    lines += ["", f"Classifier (FID network `classifier`): test accuracy {classifier.get('test_accuracy', 0):.4f} "
              f"after {classifier.get('epochs')} epochs on the train split.", "",
              "gva cos that needs no image-specific knowledge (validation split, targets of the train split): " +
              ", ".join(f"{k} {v:.4f}" for k, v in baselines.items()) + ".", "",
              "VQ tokenizer (tools/train_vq.py, {} iterations, {} s): held-out images PSNR {:.2f} dB, MSE {:.4f} on "
              "[-1, 1], codebook usage {:.3f}, perplexity {:.1f}.".format(
                  vq_report.get("iterations"), vq_report.get("train_seconds"), vq_report["val"]["psnr"],
                  vq_report["val"]["mse"], vq_report["val"]["usage"], vq_report["val"]["perplexity"]),
              "", "## Curves", "", "![validation NLL](val_nll.png)", "", "![FID](fid.png)", "",
              "## Samples (seed 0 of each run, final checkpoint)", ""]
    for arm in arms:
        lines.append(f"### {arm}")
        lines.append("")
        lines.append(" | ".join(variants))
        lines.append("|".join(["---"] * len(variants)))
        cells = []
        for variant in variants:
            spec = RunSpec(arm, variant, seeds[0])
            iters = scale.limited_iters if arm == "limited" else scale.train_iters
            cells.append(f"![{spec.name}]({samples_dir(Path('runs') / spec.name, iters, scale)}/grid.png)")
        lines.append(" | ".join(cells))
        lines.append("")
    times = json.loads(TIMES_FILE.read_text()) if TIMES_FILE is not None and TIMES_FILE.is_file() else {}
    lines += ["## Wall times", "", "Each stage's wall time in the invocation that last did its work "
              f"({os.cpu_count()} CPUs here; sampling and FID share the jobs of the training runs)."]
    lines += [f"- {k}: {v / 60:.1f} min" for k, v in times.items()]
    lines.append(f"- training runs: {sum(r['seconds'] for r in results.values()) / 60:.1f} min "
                 f"(sum over {len(results)} runs, {args.jobs} at a time)")
    plot(out, arms, variants, seeds, results, nets)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(
        {s.name: {k: v for k, v in r.items()} for s, r in results.items()}, indent=1, default=str))
    return path


def plot(out: Path, arms, variants, seeds, results, nets) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"baseline": "tab:blue", "arra": "tab:red", "shuffled": "tab:gray"}
    for name, key, ylabel in (("val_nll", None, "validation NLL"), ("fid", "fid", "FID")):
        panels = [(arm, None) for arm in arms] if key is None else [(arm, net) for arm in arms for net in nets]
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
        for ax, (arm, net) in zip(axes[0], panels):
            for variant in variants:
                rs = [results[RunSpec(arm, variant, s)] for s in seeds]
                if key is None:
                    xs, ys = rs[0]["val_its"], np.asarray([r["val_nll"] for r in rs])
                else:
                    xs = sorted(rs[0]["fid"][net])
                    ys = np.asarray([[r["fid"][net][i] for i in xs] for r in rs])
                m, sd = ys.mean(0), ys.std(0)
                ax.plot(xs, m, color=colors[variant], label=variant, marker="o" if key else None)
                ax.fill_between(xs, m - sd, m + sd, color=colors[variant], alpha=0.2)
            ax.set_title(arm if net is None else f"{arm}: {net}")
            ax.set_xlabel("iteration")
            ax.set_ylabel(ylabel)
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=100)
        plt.close(fig)


# ------------------------------------------------------------------------------------------ main
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    scale = scale_of(args)
    if scale.seeds < 1 or scale.fid_points < 1 or scale.train_iters < scale.fid_points:
        parser.error("--seeds >= 1 and --train-iters >= the number of FID points")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    global TIMES_FILE
    TIMES_FILE = out / "stage_times.json"
    sys.path[:0] = [str(STUDY_DIR), str(out / "nets")]
    started = time.perf_counter()
    try:
        splits = prepare_images(args, scale, out)
        vq = train_vq(args, scale, out, splits)
        nets: Dict[str, str] = {}
        classifier: Dict[str, float] = {}
        for net in args.fid_nets:
            if net == "classifier":
                classifier = train_classifier(args, scale, out, splits)
                nets["classifier"] = "python:study_fid_classifier:classifier"
            else:
                nets[net.rsplit(":", 1)[-1]] = net
        prefixes = build_datasets(args, scale, out, splits, vq)
        migrate_unkeyed(out)
        refs, floors = references(args, scale, out, splits, nets, vq)
        baselines = feature_baselines(prefixes, splits)
        from arra_megatron.data.manifest import DatasetManifest

        manifest = DatasetManifest.read(prefixes["train"])
        feature_dim = manifest.feature_dim
        num_classes = manifest.tokenizer_profile.num_classes
        config = model_config(args, out)
        specs = [RunSpec(arm, variant, seed) for arm in args.arms for seed in range(scale.seeds)
                 for variant in args.variants]
        _runs(specs, args, scale, out, prefixes, config, feature_dim, nets, refs, num_classes)
        results = collect(specs, out, scale, nets)
        vq_report = json.loads((vq / "train_vq.json").read_text())
        report = write_report(args, scale, out, specs, results, floors, baselines, classifier, vq_report, nets)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        logger.error("%s", error)
        return 2
    logger.info("study done in %.1f min: %s", (time.perf_counter() - started) / 60, report)
    print(report.read_text())
    return 0


@stage("training, sampling, FID")
def _runs(specs, args, scale, out, prefixes, config, feature_dim, nets, refs, num_classes) -> None:
    def one(spec: RunSpec) -> None:
        run_dir = train_run(spec, args, scale, out, prefixes, config, feature_dim)
        sample_and_score(spec, run_dir, args, scale, nets, refs, num_classes)
        logger.info("finished %s", spec.name)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for future in [pool.submit(one, spec) for spec in specs]:
            future.result()


if __name__ == "__main__":
    sys.exit(main())
