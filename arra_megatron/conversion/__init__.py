"""Megatron-Core <-> Hugging Face checkpoints, one module per model family (llama.py)."""
