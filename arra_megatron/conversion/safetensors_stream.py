"""One safetensors file written tensor by tensor, for the export's memory.

``safetensors.torch.save_file`` takes the whole file as a dict of tensors, so exporting with
its writer holds a whole shard in memory: a TinyLlama-shaped 1.1B bf16 model at the default
``--max-shard-size 5GB`` peaked at 2.95 GiB against 1.00 GiB for this writer
(``tools/bench/conversion_memory.py``). Here each tensor's bytes go to a data file as it
arrives and is dropped; the header (8-byte little-endian length, JSON, padded to 8 bytes, as
the format specifies) is put in front when the file is complete. ``safetensors`` remains the
reader and the reference: ``tests/conversion/test_export_shards.py`` checks that the files
load with ``safetensors.torch.load_file`` to the same tensors and are byte-identical to
``save_file``'s for tensors given in the order ``save_file`` lays them out.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from typing import Dict, Iterable, Optional, Tuple

import torch

from arra_megatron.conversion.common import ConversionError

# safetensors' dtype names (the format's header field "dtype").
DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
               torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(path: str, tensors: Iterable[Tuple[str, torch.Tensor]],
                      metadata: Optional[Dict[str, str]] = None) -> Dict[str, dict]:
    """Write ``tensors`` (names and tensors, consumed one at a time) to the safetensors file
    ``path``; returns its header (name -> dtype, shape, data offsets). Memory holds one tensor
    at a time."""
    header: Dict[str, dict] = {}
    offset = 0
    data_path = f"{path}.data"
    with open(data_path, "wb") as data:
        for name, tensor in tensors:
            if tensor.dtype not in DTYPE_NAMES:
                raise ConversionError(f"{name}: dtype {tensor.dtype} has no safetensors name")
            if name in header:
                raise ConversionError(f"{name}: written twice to {path}")
            raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            data.write(memoryview(raw))
            header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                            "data_offsets": [offset, offset + raw.nbytes]}
            offset += raw.nbytes
            del raw, tensor
    encoded = json.dumps({"__metadata__": metadata or {"format": "pt"}, **header}, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as out, open(data_path, "rb") as data:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        shutil.copyfileobj(data, out, 1 << 24)
    os.remove(data_path)
    return header
