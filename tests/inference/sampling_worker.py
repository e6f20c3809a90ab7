"""Runs in each worker process: sample with several settings from one checkpoint (Megatron path,
any TP), or from its Hugging Face export; returns the sampled codes."""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

PROMPTS = ["a red cat", "the dog over a small blue house under the sky", "tree", "a photo of a bird"]
SEEDS = [0, 1, 2, 3]
GUIDED = dict(cfg_scale=3.0, top_k=20, top_p=0.9, temperature=0.9)


def _sampler(prefix: str, tokenizer: str) -> Tuple[Callable[..., list], object, List[list]]:
    """(sample(decoder_cls, model, ...), the dataset's profile, the tokenized PROMPTS)."""
    from arra_megatron.inference.conditions import Condition, condition_tokens, dataset_profile
    from arra_megatron.inference.sampling import SamplingConfig, prompt_tokens, sample_image_tokens
    from arra_megatron.tokenization.text import TextTokenizer

    profile, max_seq_length = dataset_profile(prefix)
    conditions = condition_tokens([Condition(prompt=p) for p in PROMPTS], profile, TextTokenizer(tokenizer))
    prompts = [prompt_tokens(profile, c, max_seq_length) for c in conditions]

    def sample(decoder_cls, model, use_cache=True, prompts=prompts, seeds=SEEDS, guidance=None, **settings):
        config = SamplingConfig(use_cache=use_cache, **settings)
        return sample_image_tokens(decoder_cls(model, use_cache), profile, prompts, seeds, config,
                                   guidance=guidance).tolist()

    return sample, profile, prompts


def run(checkpoint: str, prefix: str, tokenizer: str, tp: int, all_checks: bool = True) -> Dict[str, list]:
    """The Megatron decoder over the checkpoint of the training loop at TP ``tp``."""
    from arra_megatron.inference.megatron_decoder import MegatronDecoder, build_inference_model
    from arra_megatron.runtime.distributed import initialize_model_parallel
    from arra_megatron.training.checkpoints import resolve

    initialize_model_parallel(tp)
    model, _ = build_inference_model(resolve(checkpoint), tp)
    sample, profile, prompts = _sampler(prefix, tokenizer)
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
                              for p, s in zip(prompts, SEEDS)],
        "cfg1_batched_with_uncond": sample(MegatronDecoder, model, guidance=True),
        "single_no_cache": sample(MegatronDecoder, model, use_cache=False, prompts=prompts[:1], seeds=[5], top_k=8),
        "image_token_range": list(profile.image_token_range),
        "codebook_size": profile.image_codebook_size,
        "tokens_per_image": profile.tokens_per_image,
    })
    return out


def run_hf(hf_dir: str, prefix: str, tokenizer: str) -> Dict[str, list]:
    """transformers' model of the export, the same requests as ``run``'s guided ones."""
    from arra_megatron.inference.hf_decoder import HFDecoder, load_hf_model

    sample, _, _ = _sampler(prefix, tokenizer)
    hf = load_hf_model(hf_dir)
    return {"hf_guided": sample(HFDecoder, hf, **GUIDED),
            "hf_guided_no_cache": sample(HFDecoder, hf, use_cache=False, **GUIDED)}
