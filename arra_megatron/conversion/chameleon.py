"""Chameleon family (``ChameleonForConditionalGeneration``) <-> Megatron-Core GPTModel.

Chameleon's language model is Llama-shaped (RMSNorm, SwiGLU, non-interleaved rotary,
no biases): every tensor maps as in ``llama.py`` except its q/k norms. Those are
LayerNorms over ``head_dim`` with a weight *and* bias per head, shapes
``(heads, head_dim)`` / ``(kv_heads, head_dim)``, applied after the projection is split
into heads and before the rotary embedding (transformers' ``ChameleonAttention``), with
``eps`` fixed at 1e-5. Megatron's ``qk_layernorm`` applies its norms at the same place;
``models/norms.py`` gives it per-head weights (flat ``[heads * head_dim]``), selected by
``--qk-layernorm --qk-layernorm-per-head``.

Not part of the GPT, carried beside the imported checkpoint:

* the VQ-VAE (``model.vqmodel.*``) as a ``save_pretrained`` ``ChameleonVQVAE`` directory
  (``CKPT/vq_model``), which ``tools/build_indexed_dataset.py --image-tokenizer`` reads and
  export writes back;
* the image-token vocabulary: Chameleon's 65,536 ids already hold the 8192 image tokens
  (``config.vocabulary_map``, names ``IMGIMG<code in letters A-J>Z``) and its BOI/EOI
  (``<racm3:break>``, ``<eoss>``), so ``CKPT/tokenizer_profile.json`` maps VQ code c to
  token id through an explicit table (``TokenizerProfile.image_token_ids``);
* ``vq_config`` and ``vocabulary_map`` in the import record, for the exported config.

Layers with ``swin_norm`` (Chameleon-30B: each sublayer's *output* is normalised before
the residual add) do not fit Megatron-Core's pre-norm layer and are refused.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional, Tuple

from arra_megatron.conversion.common import ConversionError, GPTArchitecture, SafetensorsDir, write_json
from arra_megatron.conversion.family import per_head
from arra_megatron.conversion.llama import Llama

logger = logging.getLogger(__name__)

VQ_DIR = "vq_model"
PROFILE_FILE = "tokenizer_profile.json"
BOI_TOKEN, EOI_TOKEN = "<racm3:break>", "<eoss>"  # ChameleonProcessor's image start / end tokens
QK_NORM_EPS = 1e-5  # transformers' ChameleonLayerNorm ignores the config's eps


class Chameleon(Llama):
    model_type = "chameleon"
    architectures = ("ChameleonForConditionalGeneration",)
    auxiliary_prefixes = ("model.vqmodel.",)  # the VQ-VAE, kept beside the checkpoint
    layer_transforms = {
        **Llama.layer_transforms,
        "self_attention.q_layernorm.weight": per_head("self_attn.q_norm.weight", query=True),
        "self_attention.q_layernorm.bias": per_head("self_attn.q_norm.bias", query=True),
        "self_attention.k_layernorm.weight": per_head("self_attn.k_norm.weight", query=False),
        "self_attention.k_layernorm.bias": per_head("self_attn.k_norm.bias", query=False),
    }

    def architecture_from_hf(self, config) -> GPTArchitecture:
        """The architecture of a transformers ``ChameleonConfig``; fails on what the mapping
        would not reproduce exactly."""
        if getattr(config, "swin_norm", False):
            raise ConversionError("swin_norm=True (each attention / MLP output normalised before the residual add, "
                                  "Chameleon-30B style) is not supported: Megatron-Core's layer normalises the "
                                  "sublayer inputs")
        if float(config.rms_norm_eps) != QK_NORM_EPS:
            raise ConversionError(f"rms_norm_eps {config.rms_norm_eps}: transformers' Chameleon q/k LayerNorms use "
                                  f"{QK_NORM_EPS} whatever the config says, and Megatron-LM's --norm-epsilon sets "
                                  "both norms; only rms_norm_eps 1e-5 converts exactly")
        if config.hidden_size % config.num_attention_heads:
            raise ConversionError(f"hidden_size {config.hidden_size} is not divisible by "
                                  f"{config.num_attention_heads} heads")
        if not config.vocabulary_map:
            raise ConversionError("config.json has no vocabulary_map (Chameleon's image-token vocabulary)")
        # ChameleonAttention's head_dim is always hidden_size // heads.
        return dataclasses.replace(super().architecture_from_hf(config),
                                   kv_channels=config.hidden_size // config.num_attention_heads,
                                   qk_layernorm_per_head=True)

    def hf_config(self, arch: GPTArchitecture, source: Optional[dict] = None, **extra):
        """The transformers ``ChameleonConfig`` reproducing ``arch``, with the image vocabulary and
        VQ-VAE configuration of the import record ``source``."""
        from transformers import ChameleonConfig

        if not arch.qk_layernorm_per_head:
            raise ConversionError("the checkpoint has no per-head q/k LayerNorm (--qk-layernorm-per-head): "
                                  "not a Chameleon model")
        if arch.kv_channels * arch.num_attention_heads != arch.hidden_size:
            raise ConversionError(f"Chameleon's head_dim is hidden_size / heads; the checkpoint's kv_channels "
                                  f"{arch.kv_channels} x {arch.num_attention_heads} heads != {arch.hidden_size}")
        if arch.norm_epsilon != QK_NORM_EPS:
            raise ConversionError(f"--norm-epsilon {arch.norm_epsilon}: transformers' Chameleon q/k LayerNorms use "
                                  f"{QK_NORM_EPS}, so only 1e-5 exports exactly")
        chameleon = (source or {}).get("chameleon")
        if not chameleon:
            raise ConversionError("no Chameleon import record (vocabulary_map, vq_config) found for this checkpoint: "
                                  "export a checkpoint imported with tools/convert_checkpoint.py, or one trained "
                                  "from it with --load or --pretrained-checkpoint pointing at the import, or "
                                  "give --import-dir")
        return ChameleonConfig(**self.config_kwargs(arch), vq_config=chameleon["vq_config"],
                               vocabulary_map=chameleon["vocabulary_map"], swin_norm=False, model_parallel_size=1,
                               architectures=list(self.architectures), **extra)

    def write_import_extras(self, hf: SafetensorsDir, config, out_dir: str, final_dir: str, record: dict) -> None:
        """The VQ-VAE directory, the tokenizer profile and the import record's Chameleon part.

        ``hf`` reads the source tensors; ``out_dir`` is the staging directory that becomes
        ``final_dir`` (paths recorded in the profile name the final place)."""
        from safetensors.torch import save_file
        from transformers import ChameleonVQVAEConfig

        from arra_megatron.tokenization.image import ImageTokenizer
        from arra_megatron.tokenization.profile import ModelIdentity, SpecialTokens, TokenizerProfile, content_sha256
        from arra_megatron.tokenization.text import TextTokenizer
        from arra_megatron.training.checkpoints import HF_TOKENIZER_DIR

        vq_config = config.vq_config.to_dict() if hasattr(config.vq_config, "to_dict") else dict(config.vq_config)
        record["chameleon"] = {"vq_config": vq_config, "vocabulary_map": dict(config.vocabulary_map)}

        vq_dir = os.path.join(out_dir, VQ_DIR)
        prefix = self.auxiliary_prefixes[0]
        names = [n for n in hf.names() if n.startswith(prefix)]
        if not names:
            raise ConversionError("the checkpoint has no VQ-VAE tensors (model.vqmodel.*)")
        os.makedirs(vq_dir)
        save_file({n[len(prefix):]: hf(n).contiguous() for n in names}, os.path.join(vq_dir, "model.safetensors"),
                  metadata={"format": "pt"})
        vq = ChameleonVQVAEConfig(**{k: v for k, v in vq_config.items() if k not in ("architectures", "model_type")})
        vq.architectures = ["ChameleonVQVAE"]
        vq.save_pretrained(vq_dir)
        image = ImageTokenizer(vq_dir, int(vq_config["resolution"]))  # loads it: the directory is usable as is

        def moved(identity: ModelIdentity, name: str) -> ModelIdentity:
            return dataclasses.replace(identity, path=os.path.join(os.path.abspath(final_dir), name))

        text = None
        tokenizer_dir = os.path.join(out_dir, HF_TOKENIZER_DIR)
        if os.path.isdir(tokenizer_dir):
            try:
                text = moved(TextTokenizer(tokenizer_dir).identity, HF_TOKENIZER_DIR)
            except Exception as err:  # noqa: BLE001 - the profile is still valid without the text identity
                logger.warning("tokenizer files not loadable (%s); the profile records no text tokenizer", err)

        vocab = dict(config.vocabulary_map)
        missing = [t for t in (BOI_TOKEN, EOI_TOKEN) if t not in vocab]
        if missing:
            raise ConversionError(f"vocabulary_map lacks {missing} (Chameleon's BOI / EOI tokens)")
        eos = config.eos_token_id[0] if isinstance(config.eos_token_id, (list, tuple)) else config.eos_token_id
        pad = config.pad_token_id if config.pad_token_id is not None else vocab.get("<pad>", eos)
        table = image_token_ids(vocab, image.codebook_size)
        profile = TokenizerProfile(
            vocab_size=config.vocab_size,
            text_vocab_size=config.vocab_size,  # text and image ids share Chameleon's one vocabulary
            class_token_offset=config.vocab_size,
            num_classes=0,
            image_token_offset=min(table),
            image_codebook_size=image.codebook_size,
            # No null-condition token in Chameleon's vocabulary: CFG dropout uses <pad> (an empty prompt).
            special=SpecialTokens(bos=config.bos_token_id, eos=eos, pad=pad, boi=vocab[BOI_TOKEN],
                                  eoi=vocab[EOI_TOKEN], null_condition=pad),
            image_size=image.image_size,
            tokens_per_image=image.tokens_per_image,
            image_preprocessing=image.preprocessing,
            vq_model=ModelIdentity(image.identity.kind, os.path.join(os.path.abspath(final_dir), VQ_DIR),
                                   content_sha256(vq_dir)),
            text_tokenizer=text,
            image_token_ids=table,
        )
        try:
            profile.image_token_range
        except ValueError as err:
            logger.warning("Chameleon's image tokens are not contiguous (%s): the range-based image masks of training "
                           "cannot use this profile", err)
        write_json(os.path.join(out_dir, PROFILE_FILE), profile.to_dict())
        record["tokenizer_profile"], record["vq_model"] = PROFILE_FILE, VQ_DIR

    def auxiliary_source(self, import_dir: Optional[str]) -> Optional[Tuple[SafetensorsDir, str]]:
        """The VQ-VAE an import kept in ``import_dir/vq_model``."""
        path = os.path.join(import_dir, VQ_DIR) if import_dir else None
        if path is None or not os.path.isfile(os.path.join(path, "model.safetensors")):
            logger.warning("no VQ-VAE weights found (an import's %s/): the exported model's model.vqmodel.* will be "
                           "missing and transformers initialises them randomly", VQ_DIR)
            return None
        return SafetensorsDir(path), self.auxiliary_prefixes[0]


# ---------------------------------------------------------------------------------- beside the checkpoint
def image_token_ids(vocabulary_map: dict, codebook_size: int) -> Tuple[int, ...]:
    """Token id of each VQ code, from transformers' own ``ChameleonImageVocabularyMapping``."""
    from transformers.models.chameleon.modeling_chameleon import ChameleonImageVocabularyMapping

    img2bpe = ChameleonImageVocabularyMapping(vocabulary_map).img2bpe
    if sorted(img2bpe) != list(range(codebook_size)):
        raise ConversionError(f"vocabulary_map holds image tokens for {len(img2bpe)} codes, the VQ-VAE has "
                              f"{codebook_size}")
    return tuple(int(img2bpe[c]) for c in range(codebook_size))
