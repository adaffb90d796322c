"""Model families as data: one `FamilySpec` per `general.architecture`, and hparams reading."""

from ppinfer.families.hparams import HParams, LayerParams, RopeParams, per_layer_values, read_hparams
from ppinfer.families.registry import FAMILIES, SUPPORTED_ARCHITECTURES, get_spec
from ppinfer.families.spec import FamilySpec, Mlp, Norm, Rope, SlidingWindow, Tying

__all__ = [
    "FAMILIES", "SUPPORTED_ARCHITECTURES", "FamilySpec", "HParams", "LayerParams", "Mlp", "Norm",
    "Rope", "RopeParams", "SlidingWindow", "Tying", "get_spec", "per_layer_values", "read_hparams",
]
