"""What to generate: text prompts (T2I) or class ids (C2I), turned into condition tokens exactly
as the dataset builder turns captions and class folders into them."""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

from arra_megatron.tokenization.profile import TokenizerProfile


@dataclasses.dataclass(frozen=True)
class Condition:
    """One requested image: a text prompt, a class id, or neither (the null condition: unconditional)."""

    prompt: Optional[str] = None
    class_id: Optional[int] = None

    def __post_init__(self) -> None:
        if self.prompt is not None and self.class_id is not None:
            raise ValueError("a condition is a prompt or a class id, not both")

    def record(self) -> dict:
        """The part of a ``samples.jsonl`` line that says what was asked for."""
        if self.prompt is not None:
            return {"prompt": self.prompt}
        return {"class_id": self.class_id} if self.class_id is not None else {"unconditional": True}


def read_prompts(path: str) -> List[str]:
    """One prompt per line; blank lines are skipped, surrounding whitespace removed (as the builder strips captions)."""
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompt in the file")
    return prompts


def dataset_profile(prefix: str) -> Tuple[TokenizerProfile, int]:
    """(tokenizer profile, max sequence length) recorded in dataset ``prefix``'s manifest."""
    from arra_megatron.data.manifest import DatasetManifest

    manifest = DatasetManifest.read(prefix)
    return manifest.tokenizer_profile, manifest.max_seq_length


def condition_tokens(conditions: Sequence[Condition], profile: TokenizerProfile,
                     text_tokenizer=None) -> List[List[int]]:
    """Each condition's token ids: the text tokenizer's ids of the prompt, or the class token."""
    out = []
    for condition in conditions:
        if condition.prompt is not None:
            if profile.text_vocab_size == 0:
                raise ValueError("--prompts: this model's dataset has no text vocabulary (class-conditional); "
                                 "use --class-ids")
            if text_tokenizer is None:
                raise ValueError("--prompts needs the dataset's text tokenizer (--text-tokenizer)")
            out.append(list(text_tokenizer.encode(condition.prompt)))
        elif condition.class_id is None:
            out.append([profile.special.null_condition])  # as condition dropout (drop_condition) trains it
        else:
            if profile.num_classes == 0:
                raise ValueError("--class-ids: this model's dataset has no class tokens (text-to-image); "
                                 "use --prompts")
            out.append([profile.class_token(int(condition.class_id))])
    return out
