"""Model families as data: one `FamilySpec` per `general.architecture`, and hparams reading."""

from ppinfer.families.hparams import (
    HParams,
    LayerParams,
    MoeParams,
    RopeParams,
    decoder_layers,
    per_layer_values,
    read_hparams,
)
from ppinfer.families.registry import FAMILIES, SUPPORTED_ARCHITECTURES, get_spec
from ppinfer.families.spec import (
    AttnKind,
    Experts,
    ExpertWidth,
    FamilySpec,
    Gating,
    Mlp,
    Norm,
    QkNorm,
    Rope,
    SharedExpert,
    SlidingWindow,
    Tying,
)

__all__ = [
    "FAMILIES",
    "SUPPORTED_ARCHITECTURES",
    "AttnKind",
    "ExpertWidth",
    "Experts",
    "FamilySpec",
    "Gating",
    "HParams",
    "LayerParams",
    "Mlp",
    "MoeParams",
    "Norm",
    "QkNorm",
    "Rope",
    "RopeParams",
    "SharedExpert",
    "SlidingWindow",
    "Tying",
    "decoder_layers",
    "get_spec",
    "per_layer_values",
    "read_hparams",
]
