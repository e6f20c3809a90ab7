"""Text tokenizer: a sentencepiece ``.model`` file or a Hugging Face tokenizer directory.

Both give plain ids without special tokens: the ARRA layout adds BOS/EOS itself
(profile.py), so the tokenizer's own templates (e.g. an HF BOS prefix) must not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

from arra_megatron.tokenization.profile import ModelIdentity


class TextTokenizer:
    """Encode/decode text with a local sentencepiece model or Hugging Face tokenizer (no downloads)."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_file():
            import sentencepiece

            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
            self._hf = None
            self.vocab_size = self._sp.get_piece_size()
            # sentencepiece reports -1 for a disabled special token.
            ids = {"bos": self._sp.bos_id(), "eos": self._sp.eos_id(), "pad": self._sp.pad_id()}
            kind = "sentencepiece"
        elif path.is_dir():
            from transformers import AutoTokenizer

            self._sp = None
            self._hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.vocab_size = len(self._hf)  # includes added tokens, unlike .vocab_size
            ids = {"bos": self._hf.bos_token_id, "eos": self._hf.eos_token_id, "pad": self._hf.pad_token_id}
            kind = f"huggingface:{type(self._hf).__name__}"
        else:
            raise FileNotFoundError(
                f"--text-tokenizer {path}: expected a sentencepiece .model file or a Hugging Face "
                "tokenizer directory")
        self.special_ids: Dict[str, Optional[int]] = {
            name: (i if i is not None and i >= 0 else None) for name, i in ids.items()}
        self.identity = ModelIdentity.of(kind, path)

    def encode(self, text: str) -> List[int]:
        if self._sp is not None:
            return self._sp.encode(text)
        return self._hf.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._hf.decode(ids)
