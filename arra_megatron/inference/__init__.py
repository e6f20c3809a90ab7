"""Image generation from a trained ARRA model: prompts in the training layout, sampling with a KV
cache, classifier-free guidance, top-k / top-p, decoding of the image tokens to PNGs."""
