"""Helpers the tests share: generated tokenizers, models, images and evaluation networks."""
