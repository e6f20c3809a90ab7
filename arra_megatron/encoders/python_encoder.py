"""A user's own encoder as E_F: ``python:MODULE:FUNCTION``.

The contract (``CONTRACT``): ``importlib.import_module(MODULE)`` (found on ``sys.path``,
i.e. PYTHONPATH, as ``python -c 'import MODULE'`` would find it), then
``FUNCTION(aggregation, device)`` returns ``(module, preprocess)``:

- ``module``: a ``torch.nn.Module`` mapping preprocessed float32 images [N, 3, S, S] to
  features [N, D] (floating point). It is put on ``device`` in eval mode without grads;
  D comes from one forward of a zero batch at load time.
- ``preprocess``: a mapping of ``PreprocessSpec`` fields: ``image_size`` (S),
  ``resize_mode``, ``window``, ``interpolation``, ``mean``, ``std``, optionally
  ``resize_rounding`` and ``fill_color`` (``preprocess.spec_from_mapping``). DALI, the
  reference (open_clip's transform for a centred window, SAM's processor for top-left)
  and the FID tensor path implement it; the module never sees raw images.
- ``aggregation`` is what ``--encoder-aggregation`` / ``--arra-aggregation`` say (FID
  feature nets pass ``cls``); the function raises ``ValueError`` for one it does not have.

Identity (manifests; the builder refuses to resume with another encoder): ``module``,
``function``, ``path`` (the module's file), ``source_sha256`` (the module's file and,
if elsewhere, the function's), ``weights_files`` (the module's ``weights_files``
attribute, a list of paths the function read, each hashed with ``content_sha256``) and
``sha256`` over all of them: a changed encoder source or weights file changes it.

Every failure (no module, no function, a function that raises or returns something
else, a wrong output) is a ``ValueError`` at load time naming the spec and the contract.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import re
from pathlib import Path
from typing import Any, Dict, List

import torch

from arra_megatron.encoders.base import TargetEncoder
from arra_megatron.encoders.preprocess import PreprocessSpec, spec_from_mapping
from arra_megatron.tokenization.profile import content_sha256

logger = logging.getLogger(__name__)

CONTRACT = ("a python: encoder is FUNCTION(aggregation, device) in an importable MODULE (PYTHONPATH) returning "
            "(module, preprocess): module a torch.nn.Module mapping float32 images [N, 3, S, S] to features [N, D], "
            "preprocess a mapping of PreprocessSpec fields (image_size, resize_mode, window, interpolation, mean, "
            "std; optional resize_rounding, fill_color); list weight files in module.weights_files")
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


class PythonEncoder(TargetEncoder):
    """A user's ``torch.nn.Module`` as E_F."""

    family = "python"

    def __init__(self, model: torch.nn.Module, name: str, source_files: List[Path], weights_files: List[Path],
                 aggregation: str, spec: PreprocessSpec, **kwargs) -> None:
        self.name = name
        self.source_files, self.weights_files = source_files, weights_files
        self.source_sha256 = _sha256_of(source_files)
        self._dim = 0
        super().__init__(model, source_files[0], aggregation, spec,
                         content_hash=_sha256_of(source_files + weights_files), **kwargs)
        try:
            self._dim = self.probe_dim()
        except Exception as error:  # the user's forward: any exception is a broken contract
            raise ValueError(f"python:{name}: the module's forward on a zero batch [2, 3, {spec.image_size}, "
                             f"{spec.image_size}] failed: {type(error).__name__}: {error}. {CONTRACT}") from error

    @property
    def dim(self) -> int:
        return self._dim

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images)
        if not (isinstance(out, torch.Tensor) and out.is_floating_point() and out.dim() == 2
                and out.shape[0] == len(images) and (not self._dim or out.shape[1] == self._dim)):
            got = f"{out.dtype} {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"python:{self.name}: the module gave {got} for {len(images)} images; expected "
                             f"floating-point [{len(images)}, {self._dim or 'D'}]")
        return out

    @property
    def identity(self) -> Dict[str, Any]:
        module, _, function = self.name.partition(":")
        return {**super().identity, "name": self.name, "module": module, "function": function,
                "source_sha256": self.source_sha256, "weights_files": [str(p) for p in self.weights_files]}


def _sha256_of(files: List[Path]) -> str:
    """One hash over files (or directories), in order: each one's name and ``content_sha256``."""
    outer = hashlib.sha256()
    for path in files:
        outer.update(f"{path}\0{content_sha256(path)}\n".encode())
    return outer.hexdigest()


def _source_files(module: Any, function: Any) -> List[Path]:
    files = []
    for obj in (module, function):
        try:
            path = Path(inspect.getfile(obj)).resolve()
        except TypeError:  # built in: no source file to hash
            continue
        if path.is_file() and path not in files:
            files.append(path)
    return files


def load_python(location: str, aggregation: str, device: torch.device | str = "cpu",
                bf16: bool = False) -> PythonEncoder:
    """Import ``MODULE:FUNCTION``, call it and check what it returns (see the module doc)."""
    spec_name = f"python:{location}"
    module_name, _, function_name = location.partition(":")
    if not _DOTTED.match(module_name) or not function_name.isidentifier():
        raise ValueError(f"{spec_name}: expected python:MODULE:FUNCTION with a dotted module name and a function "
                         f"name. {CONTRACT}")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # ImportError, or whatever the module raises while importing
        raise ValueError(f"{spec_name}: cannot import {module_name!r} ({type(error).__name__}: {error}); it is "
                         f"looked up on sys.path (PYTHONPATH). {CONTRACT}") from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"{spec_name}: {module_name} ({getattr(module, '__file__', '?')}) has no function "
                         f"{function_name!r}. {CONTRACT}")
    device = torch.device(device)
    try:
        result = function(aggregation, device)
    except Exception as error:
        raise ValueError(f"{spec_name}: {function_name}({aggregation!r}, {str(device)!r}) raised "
                         f"{type(error).__name__}: {error}. {CONTRACT}") from error
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise ValueError(f"{spec_name}: {function_name} returned {type(result).__name__}, expected "
                         f"(torch.nn.Module, preprocess mapping). {CONTRACT}")
    net, preprocess = result
    spec = spec_from_mapping(preprocess, spec_name)
    listed = getattr(net, "weights_files", None) or []
    weights = []
    for item in [listed] if isinstance(listed, (str, Path)) else listed:
        path = Path(item).resolve()
        if not path.exists():
            raise ValueError(f"{spec_name}: weights_files lists {item}, which does not exist")
        weights.append(path)
    sources = _source_files(module, function)
    if not sources:
        raise ValueError(f"{spec_name}: {module_name} has no source file to identify it by. {CONTRACT}")
    encoder = PythonEncoder(net, f"{module_name}:{function_name}", sources, weights, aggregation, spec,
                            device=device, bf16=bf16)
    logger.info("python encoder %s (%s): D=%d, preprocessing %s", spec_name, sources[0], encoder.dim, spec)
    return encoder
