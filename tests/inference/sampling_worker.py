"""Runs in each worker process: sample with several settings from one checkpoint (Megatron path,
any TP) and, at TP1, from its Hugging Face export; returns the sampled codes."""

from __future__ import annotations

from typing import Dict, Optional

PROMPTS = ["a red cat", "the dog over a small blue house under the sky", "tree", "a photo of a bird"]
GUIDED = dict(cfg_scale=3.0, top_k=20, top_p=0.9, temperature=0.9)


def run(checkpoint: str, prefix: str, tokenizer: str, tp: int, hf_dir: Optional[str] = None,
        all_checks: bool = True) -> Dict[str, list]:
    from arra_megatron.inference.conditions import Condition, condition_tokens, dataset_profile
    from arra_megatron.conversion.checkpoint import resolve_checkpoint
    from arra_megatron.inference.megatron_decoder import MegatronDecoder, build_inference_model
    from arra_megatron.inference.sampling import SamplingConfig, prompt_tokens, sample_image_tokens
    from arra_megatron.runtime.distributed import initialize_model_parallel
    from arra_megatron.tokenization.text import TextTokenizer

    initialize_model_parallel(tp)
    model, _ = build_inference_model(resolve_checkpoint(checkpoint), tp)
    profile, max_seq_length = dataset_profile(prefix)
    conditions = condition_tokens([Condition(prompt=p) for p in PROMPTS], profile, TextTokenizer(tokenizer))
    prompts = [prompt_tokens(profile, c, max_seq_length) for c in conditions]
    seeds = [0, 1, 2, 3]

    def sample(decoder_cls, model, use_cache=True, prompts=prompts, seeds=seeds, guidance=None, **settings):
        config = SamplingConfig(use_cache=use_cache, **settings)
        return sample_image_tokens(decoder_cls(model, use_cache), profile, prompts, seeds, config,
                                   guidance=guidance).tolist()

    out = {
        "guided": sample(MegatronDecoder, model, **GUIDED),
        "guided_no_cache": sample(MegatronDecoder, model, use_cache=False, **GUIDED),
        "unguided": sample(MegatronDecoder, model),
        # One prompt, no padding: the decode steps run with no mask (the causal core attention
        # over the KV cache).
        "single": sample(MegatronDecoder, model, prompts=prompts[:1], seeds=[5], top_k=8),
    }
    if not all_checks:
        return out
    out.update({
        "prompt_lengths": [len(p) for p in prompts],
        "guided_again": sample(MegatronDecoder, model, **GUIDED),
        "guided_other_seeds": sample(MegatronDecoder, model, seeds=[10, 11, 12, 13], **GUIDED),
        "guided_one_by_one": [sample(MegatronDecoder, model, prompts=[p], seeds=[s], **GUIDED)[0]
                              for p, s in zip(prompts, seeds)],
        "cfg1_batched_with_uncond": sample(MegatronDecoder, model, guidance=True),
        "single_no_cache": sample(MegatronDecoder, model, use_cache=False, prompts=prompts[:1], seeds=[5], top_k=8),
        "image_token_range": list(profile.image_token_range),
        "codebook_size": profile.image_codebook_size,
        "tokens_per_image": profile.tokens_per_image,
    })
    if hf_dir is not None:
        from arra_megatron.inference.hf_decoder import HFDecoder, load_hf_model

        hf = load_hf_model(hf_dir)
        out["hf_guided"] = sample(HFDecoder, hf, **GUIDED)
        out["hf_guided_no_cache"] = sample(HFDecoder, hf, use_cache=False, **GUIDED)
    return out
