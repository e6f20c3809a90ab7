"""ARRAConfig: the one declaration of the ARRA settings, their ``--arra-*`` flags and their checks.

Each field is one flag: ``--arra-`` + the field's name (``enabled`` is ``--arra`` / ``--no-arra``),
its help the field's docstring, its choices the tuple below. The training loop generates its
flag group from these fields with Megatron-LM's ``ArgumentGroupFactory`` (``add_arguments``) and
builds the config back from the parsed flags (``arra_config``); every check of an ARRA setting
is here and names the flag to change. See ../shared/design/ARRA_METHOD.md.
"""

import argparse
import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional

from arra_megatron.encoders import AGGREGATIONS, SPEC_HELP, parse_encoder_spec

OBJECTIVES = ("cos", "mse")
TARGETS = ("hybnext", "rep")
PROJECTORS = ("mlp", "pool")
TARGET_SOURCES = ("precomputed", "online")


class ARRAConfigError(ValueError):
    """A wrong ARRA setting; the message names the flag to change."""


def _flag(default, choices: Optional[tuple] = None, **argparse_meta) -> dataclasses.Field:
    """A field whose flag takes ``choices`` (and any other ``add_argument`` keyword) on top of what
    ``ArgumentGroupFactory`` infers from the annotation, the default and the docstring."""
    if choices is not None:
        argparse_meta["choices"] = choices
    return dataclasses.field(default=default, metadata={"argparse_meta": argparse_meta})


@dataclass(frozen=True)
class ARRAConfig:
    """L = L_AR + weight * L_GVA, with L_GVA computed on global layer ``align_layer``.

    ``objective``: ``cos`` (1 - cosine) or ``mse`` (squared error / D). ``target``: ``hybnext``
    (every position whose next token is an image token) or ``rep`` (the BOI position only).
    ``projector``: ``mlp`` (Linear-GELU-Linear) or ``pool`` (adaptive max pool, no parameters).
    ``aggregation``: how the frozen encoder's output becomes f_GF (``encoders/base.py``).
    The last three fields shape L_AR and the data rather than L_GVA; they hold with ``--no-arra``.
    """

    enabled: bool = _flag(True, arg_names=["--arra"], action=argparse.BooleanOptionalAction)
    """the alignment loss (--no-arra: plain next-token training)"""
    align_layer: int = 1
    """k: 1-based global layer aligned"""
    weight: float = 1.0
    """lambda, the weight of L_GVA"""
    objective: str = _flag("cos", OBJECTIVES)
    target: str = _flag("hybnext", TARGETS)
    projector: str = _flag("mlp", PROJECTORS)
    target_dim: Optional[int] = None
    """D, the dimension of f_GF (default: the dataset's feature table; 512 with --mock-data)"""
    aggregation: str = _flag("cls", AGGREGATIONS)
    targets: str = _flag("precomputed", TARGET_SOURCES)
    """f_GF from the dataset's feature table, or computed during training by --arra-encoder on the stage holding
    layer k"""
    encoder: Optional[str] = _flag(None, help=f"frozen target encoder for --arra-targets online: {SPEC_HELP}")
    z_loss_weight: float = 0.0
    """z-loss weight (1e-5 in the paper's 7B runs)"""
    condition_dropout_prob: float = 0.0
    """drop the condition of this fraction of samples (classifier-free guidance)"""
    loss_on_text: bool = _flag(False, action=argparse.BooleanOptionalAction)
    """also count text targets in L_AR"""

    #: Field name -> its flag (filled in below from the fields).
    FLAGS: ClassVar[Dict[str, str]]

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            allowed = f.metadata.get("argparse_meta", {}).get("choices")
            value = getattr(self, f.name)
            if allowed and value not in allowed:
                raise ARRAConfigError(f"{self.FLAGS[f.name]} must be one of {', '.join(allowed)}; got {value!r}")
        if not isinstance(self.align_layer, int) or self.align_layer < 1:
            raise ARRAConfigError(f"{self.FLAGS['align_layer']} must be a layer number >= 1; got {self.align_layer!r}")
        for name in ("weight", "z_loss_weight"):
            if not getattr(self, name) >= 0:
                raise ARRAConfigError(f"{self.FLAGS[name]} must be >= 0; got {getattr(self, name)!r}")
        if self.target_dim is not None and (not isinstance(self.target_dim, int) or self.target_dim < 1):
            raise ARRAConfigError(f"{self.FLAGS['target_dim']} must be a positive integer; got {self.target_dim!r}")
        if not 0.0 <= self.condition_dropout_prob <= 1.0:
            raise ARRAConfigError(f"{self.FLAGS['condition_dropout_prob']} must be in [0, 1] (1 trains an "
                                  f"unconditional model); got {self.condition_dropout_prob}")
        if self.online and not self.encoder:
            raise ARRAConfigError(f"{self.FLAGS['targets']} online needs {self.FLAGS['encoder']}")

    @property
    def online(self) -> bool:
        """f_GF computed during training by ``encoder`` (L_GVA on, ``--arra-targets online``)."""
        return self.enabled and self.targets == "online"

    @classmethod
    def dest(cls, name: str) -> str:
        """The parsed-arguments attribute of field ``name`` (``align_layer`` -> ``arra_align_layer``)."""
        return cls.FLAGS[name][2:].replace("-", "_")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ARRAConfig":
        """The config the parsed ``--arra-*`` flags describe (checked as any other)."""
        return cls(**{f.name: getattr(args, cls.dest(f.name)) for f in dataclasses.fields(cls)})

    def to_flags(self) -> List[str]:
        """The ``--arra-*`` flags that give this config (a field at its default is left out)."""
        flags: List[str] = []
        for f in dataclasses.fields(self):
            value, flag = getattr(self, f.name), self.FLAGS[f.name]
            if value == f.default:
                continue
            flags += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
        return flags

    def replace(self, **changes) -> "ARRAConfig":
        return dataclasses.replace(self, **changes)

    def with_target_dim(self, known: Dict[str, int]) -> "ARRAConfig":
        """This config with D set: ``--arra-target-dim`` when given, else the D that what records it
        agrees on (``known``: where -> D, e.g. the dataset's feature table, the target encoder, a
        checkpoint's saved arguments). Any two that disagree fail, naming both values."""
        flag = self.FLAGS["target_dim"]
        sources = ({flag: self.target_dim} if self.target_dim is not None else {}) | known
        if not sources:
            raise ARRAConfigError(f"nothing records D, the dimension of f_GF (no feature table, target encoder "
                                  f"or checkpoint gives it): set {flag}")
        (first, dim), *rest = sources.items()
        for where, other in rest:
            if other == dim:
                continue
            if first == flag:
                raise ARRAConfigError(f"{flag} {dim} does not match {where}, whose D is {other}; drop {flag} "
                                      "(D defaults to it) or change it")
            raise ARRAConfigError(f"{first} has D {dim} but {where} has D {other}; they must agree")
        return self.replace(target_dim=dim)

    def validate_for_model(
        self,
        *,
        num_layers: int,
        hidden_size: int,
        tensor_model_parallel_size: int = 1,
        encoder_dim: Optional[int] = None,
        layout_has_images: bool = True,
        mock_data: bool = False,
        context_parallel_size: int = 1,
    ) -> None:
        """Check this config against the model, the target encoder and the data.

        Args:
            num_layers: the model's total number of transformer layers.
            hidden_size: the model's hidden size H.
            tensor_model_parallel_size: TP degree; H must divide by it.
            encoder_dim: dimension of the vectors the target encoder (or feature store)
                delivers after aggregation; None when not known yet. Like every check of D, it
                waits for D to be known (``with_target_dim``).
            layout_has_images: whether the sample layout (tokenizer profile) contains an
                image span at all.
            mock_data: the run trains on ``--mock-data`` (no images for online targets).
            context_parallel_size: CP degree (L_GVA has no reduction over it).
        """
        if hidden_size % tensor_model_parallel_size:
            raise ARRAConfigError(
                f"--hidden-size {hidden_size} is not divisible by --tensor-model-parallel-size "
                f"{tensor_model_parallel_size}; change one of them"
            )
        if not self.enabled:
            return
        flags = self.FLAGS
        if self.online:
            if mock_data:
                raise ARRAConfigError(f"{flags['targets']} online reads the images of a dataset; it does not go "
                                      "with --mock-data")
            try:
                parse_encoder_spec(self.encoder)
            except ValueError as err:
                raise ARRAConfigError(f"{flags['encoder']}: {err}") from None
        if context_parallel_size > 1:
            raise ARRAConfigError("ARRA does not support --context-parallel-size > 1 (L_GVA would need a CP "
                                  "reduction); use --no-arra or drop --context-parallel-size")
        if not 1 <= self.align_layer <= num_layers:
            raise ARRAConfigError(
                f"{flags['align_layer']} {self.align_layer} is outside 1..{num_layers} (--num-layers {num_layers})"
            )
        if not layout_has_images:
            which = "rep (the BOI position)" if self.target == "rep" else "hybnext"
            raise ARRAConfigError(
                f"{flags['target']} {which} needs an image span in the sample layout, and this "
                f"layout has none; use a tokenizer profile with image tokens or --no-arra"
            )
        if self.target_dim is None:
            return
        if encoder_dim is not None:
            self.with_target_dim({f"the target encoder (aggregation {self.aggregation!r})": encoder_dim})
        if self.projector == "pool" and self.target_dim > hidden_size:
            raise ARRAConfigError(
                f"{flags['projector']} pool cannot pool hidden size {hidden_size} up to "
                f"{flags['target_dim']} {self.target_dim}; use {flags['projector']} mlp"
            )


def _flag_name(field: dataclasses.Field) -> str:
    names = field.metadata.get("argparse_meta", {}).get("arg_names")
    return names[0] if names else "--arra-" + field.name.replace("_", "-")


ARRAConfig.FLAGS = {f.name: _flag_name(f) for f in dataclasses.fields(ARRAConfig)}
