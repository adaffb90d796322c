"""`StagePlan`: which contiguous layers a stage owns. The only place stage-ness is decided."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StagePlan:
    """Layers `[layer_start, layer_end)` of a `total_layers`-layer model."""

    layer_start: int
    layer_end: int
    total_layers: int

    def __post_init__(self) -> None:
        if not 0 <= self.layer_start < self.layer_end <= self.total_layers:
            raise ValueError(
                f"invalid stage layers [{self.layer_start}, {self.layer_end}) "
                f"of a {self.total_layers}-layer model"
            )

    @property
    def is_first(self) -> bool:
        """Owns the token embedding."""
        return self.layer_start == 0

    @property
    def is_last(self) -> bool:
        """Owns the final norm and the output head."""
        return self.layer_end == self.total_layers

    @property
    def n_layers(self) -> int:
        return self.layer_end - self.layer_start

    @property
    def layer_ids(self) -> range:
        return range(self.layer_start, self.layer_end)

    @classmethod
    def whole(cls, total_layers: int) -> StagePlan:
        return cls(0, total_layers, total_layers)

    @classmethod
    def from_counts(cls, counts: list[int], stage: int) -> StagePlan:
        """The plan of stage `stage` when stages own `counts` layers each, in order."""
        start = sum(counts[:stage])
        return cls(start, start + counts[stage], sum(counts))
