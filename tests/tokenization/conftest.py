from arra_megatron.testing.tiny_data import chameleon_vq_dir, hf_tokenizer_dir, janus_vq_dir, sp_model  # noqa: F401
