"""Megatron-Core <-> Hugging Face checkpoints: ``hf_import.py`` and ``hf_export.py`` over the
model-family protocol of ``family.py``, one module per family (``llama.py``, ``chameleon.py``),
registered here; ``legacy.py`` converts checkpoints of the project's own former trainer."""

from typing import Dict

from arra_megatron.conversion.chameleon import Chameleon
from arra_megatron.conversion.family import ModelFamily
from arra_megatron.conversion.llama import Llama

# model_type -> family; a new family is a ModelFamily module and its entry here.
FAMILIES: Dict[str, ModelFamily] = {family.model_type: family for family in (Llama(), Chameleon())}
