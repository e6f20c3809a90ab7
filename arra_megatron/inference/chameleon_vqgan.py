"""Chameleon's VQGAN decoder: codes -> pixels for models trained on ChameleonVQVAE tokens.

transformers ships only the encoder half of Chameleon's image tokenizer. Meta's
release (``tokenizer/vqgan.ckpt`` + ``vqgan.yaml``) is a taming-transformers
``VQModel``; this module rebuilds its decoding path with the same parameter names,
so the released ``state_dict`` loads strictly:

    quantize.embedding.weight            codebook [n_embed, embed_dim]
    post_quant_conv                      1x1 conv embed_dim -> z_channels
    decoder.conv_in                      3x3 conv z_channels -> ch * ch_mult[-1]
    decoder.mid.block_1/attn_1/block_2   resnet, self-attention, resnet
    decoder.up.{i}.block.{j}             num_res_blocks + 1 resnets per level (i = 0 is the finest)
    decoder.up.{i}.attn.{j}              at the attn_resolutions (none in Chameleon's config)
    decoder.up.{i}.upsample.conv         nearest x2 then 3x3 conv, every level but 0
    decoder.norm_out, decoder.conv_out   GroupNorm(32), swish, 3x3 conv -> RGB

The resnet and attention blocks are transformers' Chameleon encoder blocks: taming
uses the same blocks (and names) in its encoder and decoder. The shape comes from a
``ChameleonVQVAEConfig`` (its defaults are Meta's vqgan.yaml: ch 128, ch_mult
[1, 1, 2, 2, 4], num_res_blocks 2, z_channels 256, embed_dim 256, n_embed 8192,
no attention resolutions).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ChameleonVQVAEConfig
from transformers.models.chameleon.modeling_chameleon import (
    ChameleonVQVAEEncoderAttnBlock,
    ChameleonVQVAEEncoderResnetBlock,
)


class _Upsample(nn.Module):
    """taming's Upsample with ``resamp_with_conv``: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(hidden_states, scale_factor=2.0, mode="nearest"))


class _Decoder(nn.Module):
    def __init__(self, config: ChameleonVQVAEConfig):
        super().__init__()
        mult = list(config.channel_multiplier)
        self.num_resolutions = len(mult)
        self.num_res_blocks = config.num_res_blocks
        attn_resolutions = config.attn_resolutions or []
        block_in = config.base_channels * mult[-1]
        resolution = config.resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(config.latent_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ChameleonVQVAEEncoderResnetBlock(config, block_in, block_in)
        self.mid.attn_1 = ChameleonVQVAEEncoderAttnBlock(block_in)
        self.mid.block_2 = ChameleonVQVAEEncoderResnetBlock(config, block_in, block_in)
        levels = []
        for level in reversed(range(self.num_resolutions)):
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            block_out = config.base_channels * mult[level]
            for _ in range(self.num_res_blocks + 1):
                up.block.append(ChameleonVQVAEEncoderResnetBlock(config, block_in, block_out))
                block_in = block_out
                if resolution in attn_resolutions:
                    up.attn.append(ChameleonVQVAEEncoderAttnBlock(block_in))
            if level != 0:
                up.upsample = _Upsample(block_in)
                resolution *= 2
            levels.insert(0, up)  # up[0] is the finest level, as in taming
        self.up = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(num_groups=32, num_channels=block_in, eps=1e-6, affine=True)
        self.conv_out = nn.Conv2d(block_in, config.in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(range(self.num_resolutions)):
            up = self.up[level]
            for index, block in enumerate(up.block):
                h = block(h)
                if len(up.attn):
                    h = up.attn[index](h)
            if level != 0:
                h = up.upsample(h)
        h = self.norm_out(h)
        return self.conv_out(h * torch.sigmoid(h))


class _Codebook(nn.Module):
    def __init__(self, config: ChameleonVQVAEConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.num_embeddings, config.embed_dim)


class ChameleonVQGANDecoder(nn.Module):
    """The decoding half of Chameleon's VQGAN (``VQModel.decode_code``)."""

    #: Parameter prefixes of the released checkpoint that this module holds.
    PREFIXES = ("decoder.", "post_quant_conv.", "quantize.embedding.")

    def __init__(self, config: ChameleonVQVAEConfig):
        super().__init__()
        self.config = config
        self.quantize = _Codebook(config)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.latent_channels, kernel_size=1)
        self.decoder = _Decoder(config)
        self.grid_downsample = 2 ** (len(config.channel_multiplier) - 1)

    @classmethod
    def from_checkpoint(cls, path: str, config: ChameleonVQVAEConfig | None = None) -> "ChameleonVQGANDecoder":
        """Load Meta's ``vqgan.ckpt`` (a Lightning checkpoint with ``state_dict``, or a bare state dict).

        Read with ``weights_only=True`` (no pickled code runs); the encoder and training-loss
        entries are ignored, every decoder entry must be present with its shape.
        """
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - name the file whatever torch raised
            raise ValueError(f"--vqgan-checkpoint {path}: cannot be read as a tensor checkpoint "
                             f"({type(err).__name__}: {err})") from err
        state = data.get("state_dict", data) if isinstance(data, Mapping) else None
        if not isinstance(state, Mapping):
            raise ValueError(f"--vqgan-checkpoint {path}: expected a state dict (or a dict with 'state_dict')")
        model = cls(config or ChameleonVQVAEConfig())
        model.load_state_dict({k: v for k, v in state.items() if k.startswith(cls.PREFIXES)}, strict=True)
        return model.eval()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``[B, n]`` codes in raster order (n a square) -> ``[B, 3, S, S]`` pixels in about [-1, 1]."""
        batch, n = codes.shape
        side = int(round(n ** 0.5))
        if side * side != n:
            raise ValueError(f"{n} codes per image do not form a square grid")
        weight = self.quantize.embedding.weight
        latents = self.quantize.embedding(codes.to(weight.device).long())  # [B, n, embed_dim]
        latents = latents.view(batch, side, side, -1).permute(0, 3, 1, 2).contiguous()
        return self.decoder(self.post_quant_conv(latents)).float().cpu()
