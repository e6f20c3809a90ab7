"""CLIP and BiomedCLIP targets through open_clip, loaded from a local directory.

The directory is open_clip's own ``local-dir:`` / hf-hub layout: ``open_clip_config.json``
(``model_cfg`` + ``preprocess_cfg``) and the weights (``open_clip_model.safetensors``,
``open_clip_pytorch_model.bin`` ...), loaded by ``open_clip.create_model_from_pretrained``,
which refuses a directory without weights (a random target would silently train nonsense).
BiomedCLIP is the same format with a timm ViT vision tower (``timm_model_name``).

Aggregations (all in the ``encode_image`` space, so ``concat`` is 2 x embed_dim):
- ``cls``: ``model.encode_image(x)``, the projected CLS token (512-d for ViT-B/16).
- ``avgpool``: mean over the *patch* tokens (CLS and other prefix tokens excluded) of the
  vision tower's final token sequence after its final norm (open_clip ``ln_post``, timm
  ``norm``), then the same projection ``encode_image`` applies to the CLS token
  (``visual.proj`` for open_clip ViTs, ``visual.head`` for timm towers). Projecting
  keeps avgpool in the CLS embedding's space and width; the projection is linear for
  CLIP and BiomedCLIP, so mean-then-project equals project-then-mean.
- ``concat``: [cls ; avgpool], one forward pass.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from arra_megatron.encoders.base import TargetEncoder
from arra_megatron.encoders.preprocess import PreprocessSpec, spec_from_open_clip

logger = logging.getLogger(__name__)

LOCAL_DIR = "local-dir:"


class OpenClipEncoder(TargetEncoder):
    """open_clip image tower as E_F (CLIP ViT or timm ViT tower)."""

    family = "open_clip"

    def __init__(self, model: torch.nn.Module, path: str | Path, aggregation: str, spec: PreprocessSpec,
                 **kwargs) -> None:
        self.visual = model.visual
        self._timm = hasattr(self.visual, "trunk")
        self._check_tower(aggregation, path)
        super().__init__(model, path, aggregation, spec, **kwargs)

    def _check_tower(self, aggregation: str, path: str | Path) -> None:
        """Refuse towers whose pooled output is not a CLS token, or whose patch tokens have no
        linear route into the encode_image space: the aggregation would not mean what it says."""
        visual = self.visual
        if self._timm:
            trunk = visual.trunk
            cls_pooling = getattr(trunk, "global_pool", None) == "token" and getattr(trunk, "num_prefix_tokens", 0) >= 1
            patch_route = isinstance(trunk.get_classifier(), torch.nn.Identity) and \
                isinstance(getattr(trunk, "fc_norm", torch.nn.Identity()), torch.nn.Identity)
        else:
            cls_pooling = getattr(visual, "pool_type", None) == "tok" and getattr(visual, "attn_pool", None) is None
            patch_route = getattr(visual, "attn_pool", None) is None and not getattr(visual, "final_ln_after_pool", False)
        if aggregation in ("cls", "concat") and not cls_pooling:
            raise ValueError(f"{path}: this open_clip vision tower does not pool a CLS token (timm_pool / pool_type / "
                             f"attentional pool in open_clip_config.json), so aggregation {aggregation!r} is undefined; "
                             "use 'avgpool'")
        if aggregation in ("avgpool", "concat") and not patch_route:
            raise ValueError(f"{path}: cannot map this open_clip tower's patch tokens into the encode_image space "
                             f"(attentional pool, final_ln_after_pool, or a timm classifier head used as projection); "
                             f"aggregation {aggregation!r} is undefined, use 'cls'")

    @property
    def embed_dim(self) -> int:
        """Width of ``encode_image`` (open_clip's ``embed_dim``): a ViT tower records it, a timm
        tower's is the output of its last head Linear."""
        if not self._timm:
            return int(self.visual.output_dim)
        linears = [m for m in self.visual.head.modules() if isinstance(m, torch.nn.Linear)]
        if not linears:
            raise ValueError(f"{self.path}: the timm tower has no projection head (timm_proj); cannot tell its width")
        return int(linears[-1].out_features)

    @property
    def dim(self) -> int:
        return 2 * self.embed_dim if self.aggregation == "concat" else self.embed_dim

    def _project(self, pooled_tokens: torch.Tensor) -> torch.Tensor:
        if self._timm:
            return self.visual.head(pooled_tokens)
        return pooled_tokens @ self.visual.proj if self.visual.proj is not None else pooled_tokens

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        if self.aggregation == "cls":
            return self.model.encode_image(images)
        # open_clip's forward_intermediates (both tower kinds): the last block's tokens with the
        # final norm applied and prefix tokens removed, plus the pooled encode_image output.
        out = self.visual.forward_intermediates(images, indices=1, normalize_intermediates=True, output_fmt="NLC")
        avgpool = self._project(out["image_intermediates"][-1].mean(dim=1))
        if self.aggregation == "avgpool":
            return avgpool
        return torch.cat([out["image_features"], avgpool], dim=-1)


def load_open_clip(path: str, aggregation: str, device: torch.device | str = "cpu", bf16: bool = False) -> OpenClipEncoder:
    """Load ``local-dir:/path`` (or a plain directory path) with open_clip's own loader."""
    import open_clip

    from arra_megatron.tokenization.profile import content_sha256

    directory = Path(path[len(LOCAL_DIR):] if path.startswith(LOCAL_DIR) else path)
    if not (directory / "open_clip_config.json").is_file():
        raise FileNotFoundError(f"{directory}/open_clip_config.json not found: an open_clip encoder spec must name a "
                                "directory in open_clip's local-dir format (open_clip_config.json + weights), e.g. "
                                "--arra-encoder open_clip:local-dir:/models/BiomedCLIP")
    model = open_clip.create_model_from_pretrained(f"{LOCAL_DIR}{directory}", device="cpu", return_transform=False)
    spec = spec_from_open_clip(dict(model.visual.preprocess_cfg))
    logger.info("open_clip encoder %s: preprocessing %s", directory, spec)
    return OpenClipEncoder(model, directory, aggregation, spec, device=device, bf16=bf16,
                           content_hash=content_sha256(directory))
