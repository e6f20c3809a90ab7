"""Chameleon's VQGAN decoder loads a state dict in the released taming-transformers layout strictly."""

from __future__ import annotations

import pytest
import torch
from transformers import ChameleonVQVAEConfig

from arra_megatron.inference.chameleon_vqgan import ChameleonVQGANDecoder

CH, MULT, BLOCKS, Z, EMBED, N_EMBED = 32, [1, 1, 2], 1, 8, 4, 16


def _resnet(prefix: str, cin: int, cout: int) -> dict:
    shapes = {"norm1.weight": (cin,), "norm1.bias": (cin,), "conv1.weight": (cout, cin, 3, 3), "conv1.bias": (cout,),
              "norm2.weight": (cout,), "norm2.bias": (cout,), "conv2.weight": (cout, cout, 3, 3), "conv2.bias": (cout,)}
    if cin != cout:
        shapes.update({"nin_shortcut.weight": (cout, cin, 1, 1), "nin_shortcut.bias": (cout,)})
    return {f"{prefix}.{k}": v for k, v in shapes.items()}


def _attn(prefix: str, c: int) -> dict:
    shapes = {"norm.weight": (c,), "norm.bias": (c,)}
    for name in ("q", "k", "v", "proj_out"):
        shapes.update({f"{name}.weight": (c, c, 1, 1), f"{name}.bias": (c,)})
    return {f"{prefix}.{k}": v for k, v in shapes.items()}


def taming_decoder_shapes() -> dict:
    """Parameter names and shapes of taming-transformers' VQModel decoding path (vqgan.yaml layout)."""
    top = CH * MULT[-1]
    shapes = {"quantize.embedding.weight": (N_EMBED, EMBED), "post_quant_conv.weight": (Z, EMBED, 1, 1),
              "post_quant_conv.bias": (Z,), "decoder.conv_in.weight": (top, Z, 3, 3), "decoder.conv_in.bias": (top,)}
    shapes.update(_resnet("decoder.mid.block_1", top, top))
    shapes.update(_attn("decoder.mid.attn_1", top))
    shapes.update(_resnet("decoder.mid.block_2", top, top))
    block_in = top
    for level in reversed(range(len(MULT))):
        out = CH * MULT[level]
        for j in range(BLOCKS + 1):
            shapes.update(_resnet(f"decoder.up.{level}.block.{j}", block_in, out))
            block_in = out
        if level:
            shapes.update({f"decoder.up.{level}.upsample.conv.weight": (block_in, block_in, 3, 3),
                           f"decoder.up.{level}.upsample.conv.bias": (block_in,)})
    shapes.update({"decoder.norm_out.weight": (block_in,), "decoder.norm_out.bias": (block_in,),
                   "decoder.conv_out.weight": (3, block_in, 3, 3), "decoder.conv_out.bias": (3,)})
    return shapes


def config() -> ChameleonVQVAEConfig:
    return ChameleonVQVAEConfig(embed_dim=EMBED, num_embeddings=N_EMBED, latent_channels=Z, base_channels=CH,
                                channel_multiplier=MULT, num_res_blocks=BLOCKS, resolution=16, attn_resolutions=[])


def test_defaults_are_metas_vqgan_yaml():
    c = ChameleonVQVAEConfig()
    assert (c.base_channels, list(c.channel_multiplier), c.num_res_blocks, c.latent_channels, c.embed_dim,
            c.num_embeddings, c.attn_resolutions or []) == (128, [1, 1, 2, 2, 4], 2, 256, 256, 8192, [])


def test_released_layout_loads_strictly_and_decodes(tmp_path):
    gen = torch.Generator().manual_seed(0)
    shapes = taming_decoder_shapes()
    state = {k: torch.randn(v, generator=gen) * 0.1 for k, v in shapes.items()}
    decoder = ChameleonVQGANDecoder(config())
    assert {k: tuple(v.shape) for k, v in decoder.state_dict().items()} == shapes
    # Lightning checkpoint: the encoder and the GAN loss's entries are there too, and ignored.
    extra = {"encoder.conv_in.weight": torch.zeros(CH, 3, 3, 3), "quant_conv.weight": torch.zeros(EMBED, Z, 1, 1),
             "loss.discriminator.main.0.weight": torch.zeros(1)}
    path = tmp_path / "vqgan.ckpt"
    torch.save({"state_dict": {**state, **extra}}, path)
    loaded = ChameleonVQGANDecoder.from_checkpoint(str(path), config())
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    codes = torch.randint(0, N_EMBED, (2, 16), generator=gen)
    pixels = loaded.decode(codes)
    assert pixels.shape == (2, 3, 16, 16)  # 4 x 4 codes, 4x upsampling (3 levels)
    assert torch.isfinite(pixels).all() and pixels.std() > 0
    assert not torch.equal(pixels[0], pixels[1])  # different codes, different images

    del state["decoder.up.1.upsample.conv.bias"]
    torch.save(state, path)
    with pytest.raises(RuntimeError, match="decoder.up.1.upsample.conv.bias"):
        ChameleonVQGANDecoder.from_checkpoint(str(path), config())
