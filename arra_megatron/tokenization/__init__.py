"""Tokenization for ARRA datasets: text tokenizers, VQ image tokenizers, the tokenizer profile."""

from arra_megatron.tokenization.image import ImageDecodeError, ImageTokenizer, load_rgb, to_rgb
from arra_megatron.tokenization.profile import ModelIdentity, SpecialTokens, TokenizerProfile
from arra_megatron.tokenization.text import TextTokenizer

__all__ = ["ImageDecodeError", "ImageTokenizer", "ModelIdentity", "SpecialTokens", "TextTokenizer",
           "TokenizerProfile", "load_rgb", "to_rgb"]
