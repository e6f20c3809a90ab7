"""Megatron-Core <-> Hugging Face checkpoints: the directory and sharding logic (checkpoint.py) and one
module per model family (llama.py, chameleon.py)."""
