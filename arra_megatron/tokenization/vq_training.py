"""Train a VQ image tokenizer (transformers' ``JanusVQVAE``, LlamaGen's VQ-16) for a domain without one.

The quantiser is LlamaGen's ``VectorQuantizer`` with ``codebook_l2_norm=True``
(``tokenizer/tokenizer_image/vq_model.py``), on the per-position latents of
``quant_conv(encoder(x))``:

    z   = l2norm(latent)                   e_k = l2norm(codebook row k)
    k*  = argmin_k |z - e_k|^2             (``llamagen_nearest_codes``: the dataset builder's lookup)
    z_q = e_{k*}
    x^  = decoder(post_quant_conv(z + sg(z_q - z)))        straight-through estimator
    L   = rec(x^, x) + mean((z_q - sg(z))^2) + beta * mean((sg(z_q) - z)^2),  beta = 0.25

``rec`` is the pixel MSE by default (LlamaGen's ``reconstruction_loss="l2"``) or L1.
LlamaGen's perceptual (LPIPS) and adversarial terms are left out: they need
pretrained networks this tool cannot assume. The decoder sees exactly
``l2norm(codebook)[codes]`` (up to float rounding of the straight-through sum), which
is what ``JanusVQVAE.decode`` -> ``get_codebook_entry`` feeds it, so
``ImageTokenizer(out).decode(ImageTokenizer(out).encode(x))`` is the training-time
reconstruction.

As LlamaGen: codebook initialised uniform(+-1/K) then l2-normalised, Adam with betas
(0.9, 0.95), gradient norm clipped at 1, constant learning rate (``lr_schedule="cosine"``
decays it to lr/10 instead, a function of the step only).

Not in LlamaGen: dead-code restarts (``restart_interval``): every N steps each code
no latent picked during those N steps is re-initialised to a random l2-normalised
latent of the current batch, and its Adam moments are zeroed. Small datasets and
small codebooks otherwise leave most codes unused.

Data: every image of ``--input`` (the dataset builder's readers, plus a plain
directory of images), decoded and preprocessed as the builder does
(``load_rgb`` -> ``preprocess_image``: RGB, shorter side resized with bicubic, centre
crop, [-1, 1]) and kept in memory when they fit in ``cache_mb``. Undecodable images are
skipped and counted. A seeded split holds out
``val_fraction`` of the images for reporting. The batch of step s is a pure function of
(seed, s), so a resumed run reads exactly the batches an uninterrupted one would.

Output: ``save_pretrained`` of the model (``architectures: ["JanusVQVAE"]``), the report
``train_vq.json`` (written last: its presence marks a finished run), and while training
``train_state.pt`` (model, optimizer, step, RNG, usage counts; removed when finished).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from arra_megatron.data.readers import (
    ImageRef, InputSource, decode_sample, open_source)
from arra_megatron.fileio import write_json_atomic
from arra_megatron.runtime.capabilities import resolve_device
from arra_megatron.tokenization.image import llamagen_nearest_codes, load_rgb, preprocess_image

logger = logging.getLogger(__name__)

REPORT = "train_vq.json"
STATE = "train_state.pt"
_GROUPS = 32  # JanusVQVAE's GroupNorm(num_groups=32): every channel count must be a multiple of it
# Flags that do not change what is trained: a resumed run may change them.
_RUN_ONLY = ("input", "output", "overwrite", "exit_after", "num_workers", "cache_mb", "log_interval",
             "save_interval", "device", "image_root")


@dataclass
class VQTrainConfig:
    """Flags of ``tools/train_vq.py``; every error names the flag to fix."""

    input: str
    output: str
    input_kind: str = "auto"
    image_root: Optional[str] = None
    image_column: str = "image"
    image_size: int = 256
    channel_multiplier: List[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    base_channels: int = 128
    num_res_blocks: int = 2
    latent_channels: int = 256
    codebook_size: int = 16384
    codebook_dim: int = 8
    beta: float = 0.25
    reconstruction_loss: str = "mse"
    restart_interval: int = 100  # 0: no dead-code restarts
    batch_size: int = 32
    iters: int = 10000
    lr: float = 1e-4
    lr_schedule: str = "constant"  # or "cosine": from lr down to lr / 10 at the last iteration
    adam_betas: Tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    cache_mb: float = 1024
    val_fraction: float = 0.05
    log_interval: int = 50
    save_interval: int = 500
    exit_after: Optional[int] = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.channel_multiplier = [int(m) for m in self.channel_multiplier]
        self.adam_betas = tuple(float(b) for b in self.adam_betas)
        positive = ("image_size", "base_channels", "num_res_blocks", "latent_channels", "codebook_size",
                    "codebook_dim", "batch_size", "iters", "log_interval", "save_interval")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        if not self.channel_multiplier or min(self.channel_multiplier) < 1:
            raise ValueError(f"--channel-multiplier {self.channel_multiplier}: give one or more integers >= 1")
        if self.base_channels % _GROUPS:
            raise ValueError(f"--base-channels {self.base_channels} must be a multiple of {_GROUPS} "
                             "(the model's GroupNorm has 32 groups)")
        if self.image_size % self.downsample:
            raise ValueError(f"--image-size {self.image_size} must be a multiple of the down-sampling factor "
                             f"{self.downsample} (2 ** (len(--channel-multiplier) - 1))")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"--lr-schedule {self.lr_schedule}: expected constant or cosine")
        if self.reconstruction_loss not in ("mse", "l1"):
            raise ValueError(f"--reconstruction-loss {self.reconstruction_loss}: expected mse or l1")
        if self.restart_interval < 0 or self.num_workers < 0 or self.cache_mb < 0:
            raise ValueError("--restart-interval, --num-workers and --cache-mb must be >= 0")
        if self.lr <= 0 or self.beta < 0 or self.grad_clip < 0:
            raise ValueError("--lr must be > 0, --beta and --grad-clip >= 0")
        if self.exit_after is not None and self.exit_after < 1:
            raise ValueError(f"--exit-after must be >= 1, got {self.exit_after}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device {self.device}: expected auto, cpu or cuda")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_multiplier) - 1)

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample

    def lr_at(self, step: int) -> float:
        """Learning rate of step ``step`` (0-based): a function of the step only, so resuming needs no scheduler state."""
        if self.lr_schedule == "constant":
            return self.lr
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / self.iters)))

    def training_settings(self) -> Dict[str, Any]:
        """The flags that decide the trained weights (a resumed run must have the same)."""
        return json.loads(json.dumps({k: v for k, v in asdict(self).items() if k not in _RUN_ONLY}))


def _flag(name: str) -> str:
    return name.replace("_", "-")


# ----------------------------------------------------------------------------- model


def build_model(config: VQTrainConfig):
    """A freshly initialised JanusVQVAE; the codebook initialised as LlamaGen's (uniform(+-1/K), l2-normalised)."""
    from transformers import JanusVQVAE, JanusVQVAEConfig

    torch.manual_seed(config.seed)
    model_config = JanusVQVAEConfig(
        embed_dim=config.codebook_dim, num_embeddings=config.codebook_size,
        latent_channels=config.latent_channels, base_channels=config.base_channels,
        channel_multiplier=list(config.channel_multiplier), num_res_blocks=config.num_res_blocks,
        num_patches=config.grid, architectures=["JanusVQVAE"])
    model = JanusVQVAE(model_config)
    with torch.no_grad():
        weight = model.quantize.embedding.weight
        weight.uniform_(-1.0 / config.codebook_size, 1.0 / config.codebook_size)
        weight.copy_(F.normalize(weight, p=2, dim=-1))
    return model


@dataclass
class VQOutput:
    """One forward pass: reconstruction, codes [B, h*w], VQ losses, and the l2-normalised latents [B*h*w, C]."""

    reconstruction: torch.Tensor
    codes: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    latents: torch.Tensor


def vq_forward(model, pixels: torch.Tensor, beta: float = 0.25) -> VQOutput:
    """Encode, quantise (LlamaGen VQ-16, the builder's lookup), decode; see the module docstring."""
    latents = model.quant_conv(model.encoder(pixels))                         # [B, C, h, w]
    codes = llamagen_nearest_codes(latents, model.quantize.embedding.weight)  # [B, h*w]
    z = F.normalize(latents.permute(0, 2, 3, 1), p=2, dim=-1)                 # [B, h, w, C]
    z_q = F.normalize(model.quantize.embedding.weight, p=2, dim=-1)[codes].view(z.shape)
    codebook_loss = torch.mean((z_q - z.detach()) ** 2)
    commitment_loss = beta * torch.mean((z_q.detach() - z) ** 2)
    z_q = z + (z_q - z).detach()                                               # straight-through
    reconstruction = model.decoder(model.post_quant_conv(z_q.permute(0, 3, 1, 2).contiguous()))
    return VQOutput(reconstruction, codes, codebook_loss, commitment_loss, z.detach().reshape(-1, latents.shape[1]))


def restart_dead_codes(model, optimizer: torch.optim.Optimizer, counts: torch.Tensor, latents: torch.Tensor,
                       generator: torch.Generator) -> int:
    """Codes with zero count get a random latent of ``latents`` (l2-normalised); their Adam moments are zeroed."""
    dead = torch.nonzero(counts == 0).flatten().to(latents.device)
    if dead.numel() == 0:
        return 0
    picks = torch.randint(latents.shape[0], (dead.numel(),), generator=generator).to(latents.device)
    weight = model.quantize.embedding.weight
    with torch.no_grad():
        weight[dead] = latents[picks].to(weight.dtype)
    for name, moment in optimizer.state.get(weight, {}).items():
        if name in ("exp_avg", "exp_avg_sq"):
            moment[dead] = 0
    return int(dead.numel())


# ----------------------------------------------------------------------------- data


def open_images(config: VQTrainConfig) -> InputSource:
    """The reader of ``--input``: the builder's (tar, csv, jsonl, class folders) or a plain image directory."""
    path = Path(config.input)
    kind = config.input_kind
    if kind == "auto" and path.is_dir() and not any(path.glob("*.tar")):
        kind = "folder" if any(p.is_dir() for p in path.iterdir()) else "images"
    if kind == "auto" and not path.exists() and "{" not in config.input:
        raise FileNotFoundError(f"--input {config.input}: no such file or directory")
    return open_source(config.input, kind, image_root=config.image_root, image_column=config.image_column)


def read_ref(ref: ImageRef) -> bytes:
    with open(ref.source, "rb") as f:
        f.seek(ref.offset)
        return f.read(ref.length)


@dataclass
class ImageSet:
    """The usable images of ``--input`` (by reference), the skip counts by reason, and, when they fit in
    ``cache_mb``, the preprocessed pixels [N, 3, S, S] (else each batch decodes its images again)."""

    refs: List[ImageRef]
    skipped: Dict[str, int]
    description: Dict[str, Any]
    pixels: Optional[torch.Tensor] = None

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for ref in self.refs:
            digest.update(f"{ref.source}\0{ref.offset}\0{ref.length}\n".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()


def scan_images(source: InputSource, image_size: int, cache_mb: float = 0) -> ImageSet:
    """Decode every image once: keep the decodable ones, count the others by reason (as the builder does)."""
    refs: List[ImageRef] = []
    skipped: Counter = Counter()
    cache: Optional[List[torch.Tensor]] = [] if cache_mb > 0 else None
    cache_limit = int(cache_mb * 2 ** 20) // (3 * image_size * image_size * 4)  # images of float32 pixels
    samples = source.read(0, len(source.units))
    for sample in tqdm(samples, total=len(source.units), desc="scanning images", unit="img", disable=None):
        reason, _, image = decode_sample(sample, needs_caption=False)
        if reason is None and sample.ref is None:
            reason = "image_missing"
        if reason is not None:
            skipped[reason] += 1
            continue
        refs.append(sample.ref)
        if cache is not None and len(cache) >= cache_limit:
            logger.info("the images do not fit in --cache-mb %s: decoding them again for each batch", cache_mb)
            cache = None
        if cache is not None:
            cache.append(preprocess_image(image, image_size))
    pixels = torch.stack(cache) if cache else None
    return ImageSet(refs, dict(sorted(skipped.items())), source.describe(), pixels)


class ImageRefDataset(torch.utils.data.Dataset):
    """Image i: its bytes through the builder's preprocessing, [3, S, S] in [-1, 1] (or the scan's cached copy)."""

    def __init__(self, images: ImageSet, image_size: int) -> None:
        self.refs = images.refs
        self.pixels = images.pixels
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.pixels is not None:
            return self.pixels[index]
        return preprocess_image(load_rgb(read_ref(self.refs[index])), self.image_size)


def split_indices(num_images: int, val_fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """(train, val) image indices, each sorted: a seeded permutation's first round(N * f) images are val."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed)).tolist()
    num_val = round(num_images * val_fraction)
    if val_fraction > 0 and num_images > 1:
        num_val = min(max(num_val, 1), num_images - 1)
    return sorted(order[num_val:]), sorted(order[:num_val])


class StepBatches(torch.utils.data.Sampler):
    """Batches of steps [start, stop): epoch e is a permutation seeded by (seed, e); the last partial batch is dropped."""

    def __init__(self, indices: Sequence[int], batch_size: int, seed: int, start: int, stop: int) -> None:
        self.indices = list(indices)
        self.batch_size = batch_size
        self.seed = seed
        self.start, self.stop = start, stop
        self.steps_per_epoch = len(self.indices) // batch_size

    def __len__(self) -> int:
        return self.stop - self.start

    def batch(self, step: int) -> List[int]:
        epoch, position = divmod(step, self.steps_per_epoch)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.indices), generator=generator)
        chosen = order[position * self.batch_size:(position + 1) * self.batch_size].tolist()
        return [self.indices[i] for i in chosen]

    def __iter__(self) -> Iterator[List[int]]:
        return (self.batch(step) for step in range(self.start, self.stop))


def _loader(dataset: torch.utils.data.Dataset, batch_sampler, num_workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers,
                                       persistent_workers=False)


# ----------------------------------------------------------------------------- metrics


@dataclass
class Reconstruction:
    """Reconstruction error and codebook use over a set of images (pixels in [-1, 1], reconstructions clamped)."""

    images: int
    mse: float
    psnr: float  # 10 log10(2^2 / mse): the PSNR of the images mapped to [0, 1]
    usage: float  # fraction of the codebook used at least once
    perplexity: float  # exp(entropy of the code histogram)


def code_statistics(counts: torch.Tensor) -> Tuple[float, float]:
    """(fraction of codes used, perplexity) of a code histogram."""
    counts = counts.double()
    total = counts.sum()
    if total == 0:
        return 0.0, 0.0
    p = counts[counts > 0] / total
    return float((counts > 0).double().mean()), float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def evaluate(model, dataset: torch.utils.data.Dataset, indices: Sequence[int], batch_size: int, device: torch.device,
             num_workers: int = 0) -> Optional[Reconstruction]:
    """Reconstruction error and code use of ``model`` on the images ``indices`` (None for none)."""
    if not indices:
        return None
    batch_size = max(batch_size, 64)  # no gradients: a bigger batch is cheap
    model.eval()
    batches = [list(indices[i:i + batch_size]) for i in range(0, len(indices), batch_size)]
    squared, pixels_seen = 0.0, 0
    counts = torch.zeros(model.config.num_embeddings, dtype=torch.int64)
    for pixels in _loader(dataset, batches, num_workers):
        pixels = pixels.to(device)
        out = vq_forward(model, pixels)
        squared += float(((out.reconstruction.clamp(-1, 1) - pixels) ** 2).double().sum())
        pixels_seen += pixels.numel()
        counts += torch.bincount(out.codes.flatten().cpu(), minlength=counts.numel())
    model.train()
    mse = squared / pixels_seen
    usage, perplexity = code_statistics(counts)
    return Reconstruction(len(indices), mse, 10 * math.log10(4.0 / max(mse, 1e-12)), usage, perplexity)


# ----------------------------------------------------------------------------- training


class VQTrainer:
    """Model, Adam, the restart generator and the code counts of one run; ``state_dict`` is all a resume needs."""

    def __init__(self, config: VQTrainConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.model = build_model(config).to(device).train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, betas=config.adam_betas)
        self.restart_generator = torch.Generator().manual_seed(config.seed + 1)
        self.counts = torch.zeros(config.codebook_size, dtype=torch.int64)  # codes picked since the last restart
        self.step = 0
        self.seconds = 0.0
        self.restarted = 0

    def train_step(self, pixels: torch.Tensor) -> Dict[str, Any]:
        """One optimizer step on a batch; returns its losses and code histogram."""
        config = self.config
        pixels = pixels.to(self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = config.lr_at(self.step)
        out = vq_forward(self.model, pixels, config.beta)
        if config.reconstruction_loss == "mse":
            rec = F.mse_loss(out.reconstruction, pixels)
        else:
            rec = F.l1_loss(out.reconstruction, pixels)
        loss = rec + out.codebook_loss + out.commitment_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.optimizer.step()
        self.step += 1
        used = torch.bincount(out.codes.flatten().cpu(), minlength=config.codebook_size)
        self.counts += used
        if config.restart_interval and self.step % config.restart_interval == 0:
            self.restarted += restart_dead_codes(self.model, self.optimizer, self.counts, out.latents,
                                                 self.restart_generator)
            self.counts.zero_()
        return {"loss": loss.item(), "rec": rec.item(), "vq": out.codebook_loss.item(),
                "commit": out.commitment_loss.item(), "codes": used}

    def state_dict(self) -> Dict[str, Any]:
        """Tensors, numbers and strings only: loadable with ``torch.load(weights_only=True)``."""
        return {"step": self.step, "seconds": self.seconds, "restarted": self.restarted,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "usage_counts": self.counts,
                "rng": {"torch": torch.get_rng_state(), "restart": self.restart_generator.get_state()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        self.restart_generator.set_state(state["rng"]["restart"])
        self.counts = state["usage_counts"]
        self.step, self.seconds, self.restarted = state["step"], state["seconds"], state["restarted"]


class _IntervalLog:
    """Mean losses, code use and speed over the iterations since the last log line."""

    def __init__(self, codebook_size: int) -> None:
        self.sums: Counter = Counter()
        self.steps = 0
        self.codes = torch.zeros(codebook_size, dtype=torch.int64)
        self.started = time.time()

    def add(self, metrics: Dict[str, Any]) -> Tuple[float, float]:
        """Adds a step; returns the interval's (codebook usage, perplexity) so far."""
        self.sums.update({k: v for k, v in metrics.items() if k != "codes"})
        self.codes += metrics["codes"]
        self.steps += 1
        return code_statistics(self.codes)

    def flush(self, trainer: VQTrainer) -> None:
        mean = {k: v / self.steps for k, v in self.sums.items()}
        usage, perplexity = code_statistics(self.codes)
        logger.info("iteration %d/%d | loss %.5f | rec %.5f | vq %.5f | commit %.5f | usage %.3f | perplexity %.1f "
                    "| restarted codes %d | lr %.3g | %.3f s/it", trainer.step, trainer.config.iters, mean["loss"],
                    mean["rec"], mean["vq"], mean["commit"], usage, perplexity, trainer.restarted,
                    trainer.config.lr_at(trainer.step - 1), (time.time() - self.started) / self.steps)
        self.__init__(self.codes.numel())


def _check_output(config: VQTrainConfig) -> Path:
    """Refuse to replace a finished run unless --overwrite."""
    out = Path(config.output)
    if (out / REPORT).exists() and not config.overwrite:
        raise FileExistsError(f"--output {out} holds a finished VQ model ({REPORT}); pass --overwrite to train "
                              "again or choose another --output")
    return out


def _save_state(path: Path, state: Dict[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _check_resume(state: Dict[str, Any], settings: Dict[str, Any], fingerprint: str, path: Path) -> None:
    previous = json.loads(state["settings"])
    changed = sorted(k for k in set(settings) | set(previous) if settings.get(k) != previous.get(k))
    if state["data_fingerprint"] != fingerprint:
        changed.append("input images")
    if changed:
        raise ValueError(f"{path} holds an unfinished run with other settings (changed: {changed}); rerun with "
                         "its flags to resume, or pass --overwrite to start over")


def train_vq(config: VQTrainConfig) -> Dict[str, Any]:
    """Train (or resume) and write ``config.output``; returns the report (``{"finished": False}`` after --exit-after)."""
    out = _check_output(config)
    device = torch.device(resolve_device(config.device))
    images = scan_images(open_images(config), config.image_size, config.cache_mb)
    if not images.refs:
        raise ValueError(f"--input {config.input}: no usable images (skipped: {images.skipped or 'none found'})")
    if images.skipped:
        logger.warning("skipped %d images: %s", sum(images.skipped.values()), images.skipped)
    train_indices, val_indices = split_indices(len(images.refs), config.val_fraction, config.seed)
    if len(train_indices) < config.batch_size:
        raise ValueError(f"--batch-size {config.batch_size} is larger than the {len(train_indices)} training "
                         f"images of --input {config.input}")
    logger.info("%d images: %d train, %d val; %d tokens per image (%dx%d), codebook %d x %d",
                len(images.refs), len(train_indices), len(val_indices), config.grid ** 2, config.grid,
                config.grid, config.codebook_size, config.codebook_dim)
    state_path = out / STATE
    if config.overwrite:
        for path in (out / REPORT, state_path):
            path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    dataset = ImageRefDataset(images, config.image_size)
    trainer = VQTrainer(config, device)
    settings = json.dumps(config.training_settings())
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        _check_resume(state, json.loads(settings), images.fingerprint(), state_path)
        trainer.load_state_dict(state)
        initial = Reconstruction(**json.loads(state["initial_val"])) if state["initial_val"] else None
        logger.info("resuming %s at iteration %d", state_path, trainer.step)
    else:
        initial = evaluate(trainer.model, dataset, val_indices, config.batch_size, device, config.num_workers)

    def save() -> None:
        _save_state(state_path, {**trainer.state_dict(), "settings": settings,
                                 "data_fingerprint": images.fingerprint(),
                                 "initial_val": json.dumps(asdict(initial)) if initial else ""})

    stop = config.iters if config.exit_after is None else min(config.iters, config.exit_after)
    batches = StepBatches(train_indices, config.batch_size, config.seed, trainer.step, stop)
    progress = tqdm(total=config.iters, initial=trainer.step, desc="train_vq", unit="it", disable=None)
    interval = _IntervalLog(config.codebook_size)
    seconds_before, started = trainer.seconds, time.time()
    with logging_redirect_tqdm():
        for pixels in _loader(dataset, batches, config.num_workers):
            metrics = trainer.train_step(pixels)
            usage, _ = interval.add(metrics)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", usage=f"{usage:.2f}")
            progress.update(1)
            if trainer.step % config.log_interval == 0 or trainer.step == stop:
                interval.flush(trainer)
            trainer.seconds = seconds_before + time.time() - started
            if trainer.step % config.save_interval == 0 and trainer.step < config.iters:
                save()
    progress.close()
    if trainer.step < config.iters:
        save()
        logger.info("stopped at iteration %d of %d (--exit-after); rerun without it to continue",
                    trainer.step, config.iters)
        return {"finished": False, "iterations": trainer.step}

    model = trainer.model.eval()
    model.save_pretrained(str(out))
    train_eval = train_indices[:max(len(val_indices), min(len(train_indices), 256))]
    report = {
        "finished": True,
        "iterations": trainer.step,
        "images": {"train": len(train_indices), "val": len(val_indices), "skipped": images.skipped,
                   "input": images.description},
        "train": _as_dict(evaluate(model, dataset, train_eval, config.batch_size, device, config.num_workers)),
        "val": _as_dict(evaluate(model, dataset, val_indices, config.batch_size, device, config.num_workers)),
        "initial_val": _as_dict(initial),
        "restarted_codes": trainer.restarted,
        "tokens_per_image": config.grid ** 2,
        "train_seconds": round(trainer.seconds, 1),
        "flags": json.loads(json.dumps(asdict(config))),
    }
    write_json_atomic(out / REPORT, report)
    state_path.unlink(missing_ok=True)
    val = report["val"]
    logger.info("wrote %s: val MSE %s, PSNR %s dB, codebook usage %s", out,
                *(f"{val[k]:.4g}" if val else "n/a" for k in ("mse", "psnr", "usage")))
    return report


def _as_dict(result: Optional[Reconstruction]) -> Optional[Dict[str, Any]]:
    return asdict(result) if result is not None else None
