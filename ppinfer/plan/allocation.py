"""Layer allocation: how many consecutive transformer layers each pipeline stage holds.

Pure functions over a `LayerCosts` (bytes per layer, plus the embedding charged to the first
stage and the head charged to the last), so every rank computes the same split from the same
file header before any process group exists. Three ways to choose:

- an explicit list (`pipeline.layers=[8,8,7,7]`), validated against the file's layer count;
- `uniform`: layer counts as even as possible; the first `L mod S` stages take one extra layer
  (the last stage already carries the output head, so it is the one left lighter);
- `balanced`: the contiguous split whose most expensive stage is as cheap as possible,
  computed exactly (a dynamic programme; layer and stage counts are tiny). A stage's cost is
  the bytes it reads per step (layer weights and KV, the head on the last stage, only the
  gathered rows of the embedding on the first), since on a CPU a decode step streams every
  weight it uses once: equal bytes make equal step times, which keeps the ring full.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ppinfer.errors import ConfigError

LAYER_POLICIES = ("balanced", "uniform")

LayersSpec = str | list[int]


@dataclass(frozen=True, kw_only=True)
class LayerCosts:
    """Bytes a stage must hold, per part of the model, at the runtime dtype."""

    layer_weight_bytes: list[int]
    """Weight bytes of each transformer layer, in layer order."""
    layer_kv_bytes: list[int]
    """KV-cache bytes of each layer for all the tokens a stage caches."""
    embedding_bytes: int
    """Token embedding (and its norm, if any): held by the first stage only."""
    head_bytes: int
    """Final norm + output projection (or the tied `token_embd`): held by the last stage only."""
    embedding_read_bytes: int | None = None
    """What one step reads of the embedding (a row per token gathered), which is what it
    costs in time: a stage's step time follows the bytes it streams, and the table is never
    streamed whole. None balances on `embedding_bytes` like any weight."""
    layer_expert_bytes: list[int] | None = None
    """The part of each layer's weight bytes held by Mixture-of-Experts expert tensors (None or
    zeros: a dense model)."""
    layer_read_bytes: list[int] | None = None
    """Weight bytes one decode step of a lane reads of each layer: a MoE layer reads only the
    experts its tokens choose (None: the weight bytes, as in a dense model)."""

    @property
    def embedding_cost(self) -> int:
        """The first stage's embedding as `balanced` counts it."""
        return self.embedding_bytes if self.embedding_read_bytes is None else self.embedding_read_bytes

    def __post_init__(self) -> None:
        assert len(self.layer_weight_bytes) == len(self.layer_kv_bytes), "one KV size per layer"

    @property
    def n_layers(self) -> int:
        return len(self.layer_weight_bytes)


def parse_layers(value: Any) -> LayersSpec:
    """Normalise a `pipeline.layers` value to a policy name or a plain list of ints.

    Accepts a policy name or any sequence of ints; rejects anything else with a
    `ConfigError` naming the value. Counts are checked against the model in `allocate`.
    """
    if isinstance(value, str):
        if value not in LAYER_POLICIES:
            raise ConfigError(
                f"pipeline.layers={value!r}: expected one of {', '.join(LAYER_POLICIES)} "
                "or a list of layer counts such as [8,8,7,7]"
            )
        return value
    # Hydra hands over a ListConfig, which is a Sequence too.
    if isinstance(value, Sequence):
        items = list(value)
        # bool is an int subclass, but `[true, false]` is certainly a typo.
        if items and all(isinstance(n, int) and not isinstance(n, bool) for n in items):
            return [int(n) for n in items]
    raise ConfigError(
        f"pipeline.layers={value!r}: expected one of {', '.join(LAYER_POLICIES)} "
        "or a non-empty list of integers such as [8,8,7,7]"
    )


def allocate(policy_or_list: Any, n_stages: int, costs: LayerCosts) -> list[int]:
    """Layers per stage (a list of `n_stages` positive counts summing to the layer count)."""
    spec = parse_layers(policy_or_list)
    n_layers = costs.n_layers
    if n_stages < 1:
        raise ConfigError(f"pipeline.stages={n_stages}: must be at least 1")
    if n_stages > n_layers:
        raise ConfigError(
            f"{n_stages} pipeline stages but the model has only {n_layers} layers: "
            "every stage needs at least one layer"
        )
    if isinstance(spec, list):
        return _check_explicit(spec, n_stages, n_layers)
    if spec == "uniform":
        return uniform_split(n_layers, n_stages)
    return balanced_split(costs, n_stages)


def _check_explicit(layers: list[int], n_stages: int, n_layers: int) -> list[int]:
    where = f"pipeline.layers={layers} (sum {sum(layers)}; the model has {n_layers} layers)"
    if len(layers) != n_stages:
        raise ConfigError(
            f"{where}: {len(layers)} entries for {n_stages} stages; give one per rank"
        )
    if any(n < 1 for n in layers):
        raise ConfigError(f"{where}: every stage needs at least one layer")
    if sum(layers) != n_layers:
        raise ConfigError(f"{where}: the counts must add up to the layer count")
    return list(layers)


def uniform_split(n_layers: int, n_stages: int) -> list[int]:
    """As even as possible; the first `n_layers % n_stages` stages get one extra layer."""
    base, extra = divmod(n_layers, n_stages)
    return [base + 1 if s < extra else base for s in range(n_stages)]


def balanced_split(costs: LayerCosts, n_stages: int) -> list[int]:
    """The contiguous split that minimises the most expensive stage, exactly.

    Step 1 finds the optimal bottleneck B (the smallest achievable maximum stage cost).
    Many splits usually reach B, so step 2 picks among those the one with the smallest sum of
    squared stage costs, which spreads the slack over all stages instead of piling it on one;
    both steps are dynamic programmes over suffixes (stage s takes layers [i, j), the rest go
    to stages s+1..). Remaining ties (equal costs) go to the split with more layers on the
    earlier stages, so the answer is deterministic.
    """
    n_layers = costs.n_layers
    last = n_stages - 1
    # prefix[k]: bytes of layers [0, k), so any stage's layer bytes cost O(1).
    prefix = [0]
    for w, kv in zip(costs.layer_weight_bytes, costs.layer_kv_bytes):
        prefix.append(prefix[-1] + w + kv)

    def cost(s: int, i: int, j: int) -> int:
        extra = (costs.embedding_cost if s == 0 else 0) + (costs.head_bytes if s == last else 0)
        return prefix[j] - prefix[i] + extra

    # The stage that starts at layer i as stage s may end anywhere leaving a layer for
    # each later stage: j in [i+1, n_layers - (last - s)].
    def ends(s: int, i: int) -> range:
        return range(i + 1, n_layers - (last - s) + 1)

    # bottleneck[s][i]: the best maximum cost of stages s..last over layers [i, n_layers).
    inf = float("inf")
    bottleneck = [[inf] * (n_layers + 1) for _ in range(n_stages + 1)]
    bottleneck[n_stages][n_layers] = 0
    for s in range(last, -1, -1):
        for i in range(s, n_layers - (last - s)):
            bottleneck[s][i] = min(
                max(cost(s, i, j), bottleneck[s + 1][j]) for j in ends(s, i)
            )
    limit = bottleneck[0][0]

    # squares[s][i]: the least sum of squared costs of stages s..last over [i, n_layers)
    # with every stage within `limit`; None where no such split exists.
    squares: list[list[Any]] = [[None] * (n_layers + 1) for _ in range(n_stages + 1)]
    squares[n_stages][n_layers] = 0
    for s in range(last, -1, -1):
        for i in range(s, n_layers - (last - s)):
            options = [
                cost(s, i, j) ** 2 + squares[s + 1][j]
                for j in ends(s, i)
                if cost(s, i, j) <= limit and squares[s + 1][j] is not None
            ]
            squares[s][i] = min(options) if options else None

    # Walk forward, taking the longest stage among the optimal choices at each step.
    split: list[int] = []
    i = 0
    for s in range(n_stages):
        best = squares[s][i]
        j = max(
            j
            for j in ends(s, i)
            if cost(s, i, j) <= limit
            and squares[s + 1][j] is not None
            and cost(s, i, j) ** 2 + squares[s + 1][j] == best
        )
        split.append(j - i)
        i = j
    assert i == n_layers and len(split) == n_stages, "the walk covers every layer once"
    return split


def plan_table(layers: Sequence[int], costs: LayerCosts) -> str:
    """A fixed-width table of the split, one row per rank, for rank 0 to log.

    Weights include the embedding on the first stage and the head on the last; the `holds`
    column says which of those a stage carries. A Mixture-of-Experts model adds the part of
    the weights held by experts and the layer weights a decode step reads (the chosen experts
    only).
    """
    mib = 1024.0 * 1024.0
    experts = costs.layer_expert_bytes if costs.layer_expert_bytes and any(costs.layer_expert_bytes) else None
    read = costs.layer_read_bytes if experts else None
    header = f"{'rank':>4}  {'layers':>9}  {'n':>3}  {'weights MiB':>11}  {'kv MiB':>8}  "
    header += f"{'experts MiB':>11}  " if experts else ""
    header += f"{'read/step MiB':>13}  holds" if read else "holds"
    rows = [header]
    start = 0
    last = len(layers) - 1
    for rank, n in enumerate(layers):
        end = start + n
        weights = sum(costs.layer_weight_bytes[start:end])
        held = []
        if rank == 0:
            weights += costs.embedding_bytes
            held.append("embedding")
        if rank == last:
            weights += costs.head_bytes
            held.append("head")
        kv = sum(costs.layer_kv_bytes[start:end])
        span = f"{start}-{end - 1}"
        row = f"{rank:>4}  {span:>9}  {n:>3}  {weights / mib:>11.2f}  {kv / mib:>8.2f}  "
        if experts:
            row += f"{sum(experts[start:end]) / mib:>11.2f}  "
        if read:
            row += f"{sum(read[start:end]) / mib:>13.2f}  "
        rows.append(row + ("+".join(held) or "-"))
        start = end
    return "\n".join(rows)
