"""FID, IS, CLIP-Score and MS-SSIM of a folder of generated images, with the libraries' own code.

One decoding pass over the generated images feeds every network (the FID feature net,
Inception for IS, the CLIP model); the metric arithmetic is the libraries':

- FID: torch-fidelity's ``fid_features_to_statistics`` (mu, sigma of the features) and
  ``fid_statistics_to_metric`` (||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), float64).
  The reference is a folder (same feature net) or a statistics file (``.npz`` with
  ``mu`` and ``sigma``, as ADM / LlamaGen reference batches and pytorch-fid stats are;
  ``save_stats`` writes one, recording the feature net).
- IS: torch-fidelity's ``isc_features_to_metric`` on InceptionV3's unbiased logits
  (``splits`` chunks, shuffled with a fixed seed): exp(E_x KL(p(y|x) || p(y))), mean and std.
- CLIP-Score: torchmetrics' ``CLIPScore`` (update/compute) driven by an open_clip model
  loaded from a local directory (CLIP, BiomedCLIP) through ``arra_megatron.encoders``.
  torchmetrics defines CLIPScore = max(100 * mean_i cos(E_I(i), E_T(i)), 0); its
  model hook is Hugging Face CLIP's ``get_image_features`` / ``get_text_features``, which
  ``OpenClipForCLIPScore`` provides. The paper reports the plain mean cosine (0.45 for
  BiomedCLIP on MIMIC-CXR): that is ``clip_cosine`` in the report.
- MS-SSIM: torchmetrics' ``MultiScaleStructuralSimilarityIndexMeasure`` (data range 1,
  Gaussian 11x11 window, the 5 standard scale weights) averaged over ``pairs`` random
  pairs of distinct generated images (seeded): the diversity measure of medical
  image-generation papers (lower = more diverse). torchmetrics needs at least 176 px
  per side for its 5 scales of an 11-pixel window.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from arra_megatron.evaluation.feature_nets import (INCEPTION_WEIGHTS_REQUIRED, FeatureNet, InceptionFeatures,
                                                   load_feature_net)
from arra_megatron.evaluation.images import (MAX_LISTED_SKIPS, PROMPTS_FILE, SkipLog, iterate_images, list_images,
                                             read_image, read_prompts, stack_by_shape, to_uint8)
from arra_megatron.runtime.capabilities import resolve_device

logger = logging.getLogger(__name__)

METRICS = ("fid", "is", "clip-score", "ms-ssim")
REPORT_VERSION = 1


# ----------------------------------------------------------------------------------------- FID
class FeatureMoments:
    """Count, mean and scatter matrix of features seen batch by batch (float64), so a FID over any
    number of images needs O(D^2) memory, not O(N D). Batches are combined with Chan et al.'s
    pairwise update (stable when the features share a large offset, as post-ReLU features do)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: Optional[np.ndarray] = None
        self.scatter: Optional[np.ndarray] = None

    def update(self, features: torch.Tensor) -> None:
        x = features.detach().double().cpu().numpy()
        if x.ndim != 2 or not len(x):
            return
        mean = x.mean(axis=0)
        centred = x - mean
        self.combine(len(x), mean, centred.T @ centred)

    def combine(self, n: int, mean: np.ndarray, scatter: np.ndarray) -> None:
        if self.n == 0:
            self.n, self.mean, self.scatter = n, mean.copy(), scatter.copy()
            return
        total = self.n + n
        delta = mean - self.mean
        self.scatter += scatter + np.outer(delta, delta) * (self.n * n / total)
        self.mean += delta * (n / total)
        self.n = total

    def covariance(self) -> np.ndarray:
        return self.scatter / (self.n - 1)


@dataclass
class FeatureStats:
    """Mean and covariance of a feature set (float64), with the net that produced them."""

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int
    feature_net: Dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_features(cls, features: torch.Tensor, feature_net: Dict[str, str]) -> "FeatureStats":
        moments = FeatureMoments()
        moments.update(features)
        return cls.from_moments(moments, feature_net)

    @classmethod
    def from_moments(cls, moments: FeatureMoments, feature_net: Dict[str, str]) -> "FeatureStats":
        if moments.n < 2:
            raise ValueError(f"FID needs at least 2 images' features, got {moments.n}")
        return cls(moments.mean.copy(), moments.covariance(), moments.n, dict(feature_net))

    def save(self, path: str | Path) -> None:
        """``.npz`` with ``mu``, ``sigma`` (the keys other tools read), ``num_images`` and ``feature_net``
        (JSON); written to a temporary name and renamed."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            np.savez(f, mu=self.mu, sigma=self.sigma, num_images=np.int64(self.num_images),
                     feature_net=np.array(json.dumps(self.feature_net, sort_keys=True)))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "FeatureStats":
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                keys = set(data.files)
                if not {"mu", "sigma"} <= keys:
                    raise ValueError(f"--ref {path}: a statistics file needs arrays 'mu' and 'sigma', "
                                     f"found {sorted(keys)}")
                mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
                num = int(data["num_images"]) if "num_images" in keys else 0
                net = json.loads(str(data["feature_net"])) if "feature_net" in keys else {}
        except (OSError, EOFError, ValueError) as error:  # not a zip / not .npz
            if isinstance(error, ValueError) and str(error).startswith("--ref"):
                raise
            raise ValueError(f"--ref {path}: not a readable .npz statistics file ({error})") from error
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"--ref {path}: mu {mu.shape} and sigma {sigma.shape} are not [D] and [D, D]")
        return cls(mu, sigma, num, net)


def frechet_distance(generated: FeatureStats, reference: FeatureStats) -> float:
    """FID between two statistics, by torch-fidelity; refuses statistics of different feature nets."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    if generated.mu.shape != reference.mu.shape:
        raise ValueError(f"FID: generated features are {generated.mu.shape[0]}-d but the reference statistics are "
                         f"{reference.mu.shape[0]}-d: they come from different feature nets or layers")
    a, b = generated.feature_net.get("name"), reference.feature_net.get("name")
    if a and b and a != b:
        raise ValueError(f"FID: reference statistics were computed with {b!r}, the generated images with {a!r}")
    if not (a and b):
        logger.warning("FID: the reference statistics do not record their feature net; assuming %s", a or b)
    elif generated.feature_net.get("sha256") != reference.feature_net.get("sha256"):
        logger.warning("FID: the reference statistics were computed with other %s weights (%s)", b,
                       reference.feature_net.get("weights"))
    out = fid_statistics_to_metric({"mu": generated.mu, "sigma": generated.sigma},
                                   {"mu": reference.mu, "sigma": reference.sigma}, verbose=False)
    return float(out["frechet_inception_distance"])


# ------------------------------------------------------------------------------------------ IS
def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 2020) -> Tuple[float, float]:
    """(mean, std) over ``splits`` chunks of exp(E KL(p(y|x) || p(y))), torch-fidelity's IS."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    if logits.shape[0] < splits:
        raise ValueError(f"IS with {splits} splits needs at least {splits} images, got {logits.shape[0]} (--is-splits)")
    out = isc_features_to_metric(logits.cpu(), splits=splits, shuffle=True, rng_seed=seed)
    return float(out["inception_score_mean"]), float(out["inception_score_std"])


# ---------------------------------------------------------------------------------- CLIP-Score
class OpenClipForCLIPScore(torch.nn.Module):
    """An open_clip model behind the two methods torchmetrics' CLIPScore calls on HF CLIP."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = SimpleNamespace()  # CLIPScore looks for config.text_config (HF only)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values).float()

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.model.encode_text(input_ids).float()


class OpenClipProcessor:
    """CLIPScore's processor hook: open_clip's own eval transform and tokenizer."""

    def __init__(self, spec: Any, tokenizer: Any) -> None:
        self.spec, self.tokenizer = spec, tokenizer

    def __call__(self, images: Optional[Sequence[torch.Tensor]] = None, text: Optional[Sequence[str]] = None,
                 **_: Any) -> Dict[str, torch.Tensor]:
        from torchvision.transforms.functional import to_pil_image

        from arra_megatron.encoders.preprocess import reference_preprocess

        if images is not None:
            return {"pixel_values": reference_preprocess(self.spec, [to_pil_image(i) for i in images])}
        ids = self.tokenizer(list(text))
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def clip_score_metric(model_dir: str, device: torch.device) -> Any:
    """torchmetrics ``CLIPScore`` over the open_clip model in ``model_dir`` (open_clip local-dir format),
    loaded by the encoders package's loader (weights required, never downloaded)."""
    import open_clip
    from torchmetrics.multimodal.clip_score import CLIPScore

    from arra_megatron.encoders.open_clip_encoder import LOCAL_DIR, load_open_clip

    encoder = load_open_clip(model_dir, "cls", device=device)
    directory = Path(encoder.path)
    tokenizer = open_clip.get_tokenizer(f"{LOCAL_DIR}{directory}")
    model = OpenClipForCLIPScore(encoder.model)
    return CLIPScore(model_name_or_path=lambda: (model, OpenClipProcessor(encoder.spec, tokenizer))).to(device)


# ------------------------------------------------------------------------------------- MS-SSIM
def random_pairs(n: int, count: int, seed: int) -> np.ndarray:
    """``count`` pairs (i, j), i != j, drawn uniformly (with replacement across pairs) from range(n)."""
    if n < 2:
        raise ValueError(f"MS-SSIM needs at least 2 usable images, got {n}")
    rng = np.random.default_rng(seed)
    first = rng.integers(0, n, count)
    second = (first + rng.integers(1, n, count)) % n  # uniform over the other n - 1 images
    return np.stack([first, second], axis=1)


def ms_ssim_of_pairs(files: Sequence[Path], pairs: np.ndarray, batch_size: int, device: torch.device,
                     progress: bool = True) -> float:
    """Mean torchmetrics MS-SSIM over ``pairs`` of ``files`` (RGB, [0, 1])."""
    from torchmetrics.image import MultiScaleStructuralSimilarityIndexMeasure

    metric = MultiScaleStructuralSimilarityIndexMeasure(data_range=1.0).to(device)

    def load(index: int) -> torch.Tensor:
        return to_uint8([read_image(files[index])])[0].float().div(255)

    for start in tqdm(range(0, len(pairs), batch_size), desc="MS-SSIM pairs", unit="batch", disable=not progress):
        chunk = pairs[start:start + batch_size]
        a = [load(i) for i in chunk[:, 0]]
        b = [load(j) for j in chunk[:, 1]]
        shapes = {tuple(t.shape) for t in a + b}
        if len(shapes) != 1:
            raise ValueError(f"MS-SSIM needs generated images of one size, found {sorted(shapes)}")
        try:
            metric.update(torch.stack(a).to(device), torch.stack(b).to(device))
        except ValueError as error:  # torchmetrics: image too small for 5 scales
            raise ValueError(f"MS-SSIM on images of shape {shapes.pop()}: {error}") from error
    return float(metric.compute())


# ------------------------------------------------------------------------------------ evaluate
@dataclass
class EvalConfig:
    """What ``tools/evaluate.py`` asks for; every field is a flag of the same name."""

    generated: Optional[str] = None
    ref: Optional[str] = None
    metrics: Tuple[str, ...] = ("fid", "is")
    inception_weights: Optional[str] = None
    inception_features: str = "2048"
    fid_feature_net: str = "inception"
    allow_pickled_weights: bool = False  # a --fid-feature-net weights file that is a pickled model (runs its code)
    clip_model: Optional[str] = None
    prompts: Optional[str] = None
    ms_ssim_pairs: int = 1000
    is_splits: int = 10
    image_size: Optional[int] = None
    save_ref_stats: Optional[str] = None
    batch_size: int = 50
    workers: int = 0
    seed: int = 0
    device: str = "auto"  # auto: CUDA when visible
    progress: bool = True

    def __post_init__(self) -> None:
        self.device = resolve_device(self.device)
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"--metrics {' '.join(unknown)}: unknown; choose from {' '.join(METRICS)}")
        if self.generated is None and not (self.ref and self.save_ref_stats):
            raise ValueError("--generated is required (or --ref FOLDER --save-ref-stats OUT.npz alone)")
        if self.generated is not None:
            if "fid" in self.metrics and not self.ref:
                raise ValueError("--metrics fid needs --ref (a folder of real images or a .npz statistics file)")
            if "clip-score" in self.metrics and not self.clip_model:
                raise ValueError("--metrics clip-score needs --clip-model (an open_clip local-dir, e.g. BiomedCLIP)")
            if "ms-ssim" in self.metrics and self.ms_ssim_pairs < 1:
                raise ValueError(f"--ms-ssim-pairs must be >= 1, got {self.ms_ssim_pairs}")
        if self.save_ref_stats and (not self.ref or Path(self.ref).suffix == ".npz"):
            raise ValueError("--save-ref-stats needs --ref to be a folder of images")
        for name in ("batch_size", "is_splits"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        metrics = set(self.metrics) if self.generated else set()
        fid = "fid" in metrics or bool(self.save_ref_stats)
        if ("is" in metrics or (fid and self.fid_feature_net == "inception")) and not self.inception_weights:
            raise ValueError(INCEPTION_WEIGHTS_REQUIRED)


@dataclass
class _Pass:
    """What one pass over a folder collected."""

    files: List[Path]
    used: List[int]
    skips: SkipLog
    moments: Optional[FeatureMoments] = None   # of the FID features, accumulated batch by batch
    logits: Optional[torch.Tensor] = None      # IS logits [N, classes] (the splits need them all)


def _world() -> Tuple[int, int]:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@torch.no_grad()
def _extract(folder: str, files: List[Path], flag: str, net: Optional[torch.nn.Module], cfg: EvalConfig,
             device: torch.device, clip: Any = None, prompts: Optional[List[str]] = None) -> _Pass:
    """Decode ``files`` once; run the feature net (features, logits) and update CLIP-Score on each batch.
    Under torchrun each process takes every world-th file and the results are gathered."""
    rank, world = _world()
    mine = list(range(rank, len(files), world))
    result = _Pass(files=files, used=[], skips=SkipLog(), moments=FeatureMoments() if net is not None else None)
    logits: List[torch.Tensor] = []
    size = cfg.image_size if flag == "--ref" else None
    batches = iterate_images([files[i] for i in mine], result.skips, cfg.batch_size, cfg.workers, size,
                             progress=f"{flag.lstrip('-')} images" if cfg.progress and rank == 0 else None)
    for local, images in batches:
        indices = [mine[i] for i in local]
        tensors = to_uint8(images)
        batch_features: List[Optional[torch.Tensor]] = [None] * len(tensors)
        batch_logits: List[Optional[torch.Tensor]] = [None] * len(tensors)
        for positions, stacked in stack_by_shape(tensors):
            if net is not None:
                out = net(stacked.to(device))
                for k, p in enumerate(positions):
                    batch_features[p] = out["features"][k].cpu()
                    if "logits" in out:
                        batch_logits[p] = out["logits"][k].cpu()
            if clip is not None:
                clip.update(list(stacked.to(device)), [prompts[indices[p]] for p in positions])
        if net is not None:
            result.moments.update(torch.stack(batch_features))
            if batch_logits[0] is not None:
                logits.append(torch.stack(batch_logits))
        result.used.extend(indices)
    if world > 1:
        _gather(result, logits)
    if not result.used:
        raise ValueError(f"{flag} {folder}: none of the {len(files)} image files could be decoded "
                         f"({dict(result.skips.counts)})")
    result.logits = torch.cat(logits) if logits else None
    return result


def _gather(result: _Pass, logits: List[torch.Tensor]) -> None:
    """Every process's share into one ``_Pass`` on every process: moments combined in rank order,
    used files and IS logits in file order, skips merged."""
    local = {"used": result.used, "logits": torch.cat(logits) if logits else None,
             "moments": None if result.moments is None or not result.moments.n else
             (result.moments.n, result.moments.mean, result.moments.scatter),
             "skips": (dict(result.skips.counts), result.skips.files)}
    shares = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(shares, local)
    if result.moments is not None:
        result.moments = FeatureMoments()
        for share in shares:
            if share["moments"] is not None:
                result.moments.combine(*share["moments"])
    used = [i for share in shares for i in share["used"]]
    order = np.argsort(used, kind="stable")
    result.used = [used[i] for i in order]
    parts = [share["logits"] for share in shares if share["logits"] is not None]
    logits.clear()
    if parts:
        logits.append(torch.cat(parts)[torch.from_numpy(order)])
    result.skips = SkipLog()
    for share in shares:
        counts, listed = share["skips"]
        result.skips.counts.update(counts)
        for reason, paths in listed.items():
            result.skips.files.setdefault(reason, []).extend(paths)
    for reason, paths in result.skips.files.items():  # as one process lists them: the first, in file order
        result.skips.files[reason] = sorted(paths)[:MAX_LISTED_SKIPS]


def _folder_summary(path: str, run: _Pass) -> Dict[str, Any]:
    return {"path": str(path), "images": len(run.files), "used": len(run.used), **run.skips.to_dict()}


def evaluate(cfg: EvalConfig) -> Dict[str, Any]:
    """Run the asked metrics; returns the report (``tools/evaluate.py`` writes it as JSON).

    Under torchrun (``WORLD_SIZE`` > 1) the processes share every pass over the images (one GPU
    each, ``LOCAL_RANK``); the report is the same on every process."""
    device = torch.device(cfg.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":  # this process's GPU before NCCL starts (its buffers live there)
            device = torch.device(resolve_device("cuda", local_rank=int(os.environ.get("LOCAL_RANK", "0"))))
            torch.cuda.set_device(device)
            torch.distributed.init_process_group("nccl", device_id=device)
        else:
            torch.distributed.init_process_group("gloo")
    metrics = set(cfg.metrics) if cfg.generated else set()
    fid = "fid" in metrics or bool(cfg.save_ref_stats)
    # Inputs first, networks after: a wrong folder, statistics file or prompts index fails
    # before any weights are loaded.
    gen_files = list_images(cfg.generated, "--generated") if metrics else []
    ref_is_stats = fid and Path(cfg.ref).suffix == ".npz"
    ref_files = list_images(cfg.ref, "--ref") if fid and not ref_is_stats else []
    reference = FeatureStats.load(cfg.ref) if ref_is_stats else None
    prompts_path = Path(cfg.prompts) if cfg.prompts else Path(cfg.generated or ".") / PROMPTS_FILE
    prompts = read_prompts(prompts_path, Path(cfg.generated), gen_files) if "clip-score" in metrics else None

    fid_net: Optional[FeatureNet] = None
    inception: Optional[FeatureNet] = None
    if fid:
        fid_net = load_feature_net(cfg.fid_feature_net, cfg.inception_weights, cfg.inception_features,
                                   logits="is" in metrics, allow_pickle=cfg.allow_pickled_weights).to(device)
    if "is" in metrics:
        inception = fid_net if isinstance(fid_net, InceptionFeatures) else \
            InceptionFeatures(cfg.inception_weights, cfg.inception_features, logits=True).to(device)
    report: Dict[str, Any] = {"version": REPORT_VERSION, "metrics": {}, "settings": {
        "metrics": sorted(metrics), "batch_size": cfg.batch_size, "seed": cfg.seed, "device": str(device)}}
    if fid_net is not None:
        report["settings"]["fid_feature_net"] = fid_net.identity
    if inception is not None:
        report["settings"]["inception"] = inception.identity
        report["settings"]["is_splits"] = cfg.is_splits

    if reference is not None:
        report["reference"] = {"path": cfg.ref, "kind": "statistics", "images": reference.num_images,
                               "feature_net": reference.feature_net}
    elif fid_net is not None:
        ref_pass = _extract(cfg.ref, ref_files, "--ref", fid_net, cfg, device)
        reference = FeatureStats.from_moments(ref_pass.moments, fid_net.identity)
        report["reference"] = {"kind": "folder", "image_size": cfg.image_size, **_folder_summary(cfg.ref, ref_pass)}
        if cfg.save_ref_stats:
            if _world()[0] == 0:
                reference.save(cfg.save_ref_stats)
            report["reference"]["saved_stats"] = cfg.save_ref_stats
            logger.info("wrote reference statistics of %d images to %s", reference.num_images, cfg.save_ref_stats)
    if not metrics:
        return report

    clip = clip_score_metric(cfg.clip_model, device) if prompts is not None else None
    # One pass: the FID net gives the logits too when it is the IS Inception; otherwise both nets
    # run on each decoded batch.
    if fid_net is None or inception is None or fid_net is inception:
        net = fid_net or inception
    else:
        net = _Both(fid_net, inception)
    gen = _extract(cfg.generated, gen_files, "--generated", net, cfg, device, clip, prompts)
    report["generated"] = _folder_summary(cfg.generated, gen)
    out = report["metrics"]
    if "fid" in metrics:
        out["fid"] = frechet_distance(FeatureStats.from_moments(gen.moments, fid_net.identity), reference)
    if "is" in metrics:
        out["inception_score"], out["inception_score_std"] = inception_score(gen.logits, cfg.is_splits, seed=2020)
    if clip is not None:
        out["clip_score"] = float(clip.compute())
        out["clip_cosine"] = float(clip.score / clip.n_samples / 100)
        report["settings"]["clip_model"] = str(Path(cfg.clip_model).resolve())
        report["settings"]["prompts"] = str(prompts_path)
    if "ms-ssim" in metrics and _world()[0] == 0:  # a few hundred pairs: one process
        usable = [gen.files[i] for i in gen.used]
        pairs = random_pairs(len(usable), cfg.ms_ssim_pairs, cfg.seed)
        out["ms_ssim"] = ms_ssim_of_pairs(usable, pairs, cfg.batch_size, device, cfg.progress)
        out["ms_ssim_pairs"] = int(len(pairs))
    return report


class _Both(torch.nn.Module):
    """FID features from one net, IS logits from Inception, on the same batch."""

    def __init__(self, fid_net: FeatureNet, inception: FeatureNet) -> None:
        super().__init__()
        self.fid_net, self.inception = fid_net, inception

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"features": self.fid_net(images)["features"], "logits": self.inception(images)["logits"]}


def format_report(report: Dict[str, Any]) -> str:
    """The metrics and image counts as an aligned two-column table."""
    rows: List[Tuple[str, str]] = []
    for key, value in report.get("metrics", {}).items():
        rows.append((key, f"{value:.4f}" if isinstance(value, float) else str(value)))
    for part in ("generated", "reference"):
        info = report.get(part)
        if info and "images" in info:
            used = f"{info['used']} used of " if "used" in info else ""
            skipped = sum(info.get("skipped", {}).values())
            rows.append((f"{part} images", f"{used}{info['images']}" + (f" ({skipped} skipped)" if skipped else "")))
    width = max((len(name) for name, _ in rows), default=0)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
