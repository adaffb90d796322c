"""The planner: from the scenarios asked for, the runs to make (each once) and the ratios to
compute from them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ppinfer.bench.metrics import Ratio
from ppinfer.bench.runs import LlamaCppRun, PeerRun, PipelineRun, Run, Sizes
from ppinfer.bench.scenarios import ALL, SCENARIOS, SUITES, scenario_ratios


@dataclass(frozen=True)
class Plan:
    """The runs to make (each once; pipeline points first, then the transformers peer, then
    llama.cpp) and the ratios to compute from them."""

    scenarios: tuple[str, ...]
    runs: tuple[Run, ...]
    ratios: tuple[Ratio, ...]


def plan(scenarios: Sequence[str], sizes: Sizes) -> Plan:
    """The plan for `scenarios` (names from SCENARIOS or SUITES, or `all`)."""
    table = scenario_ratios(sizes)
    wanted: set[str] = set()
    for name in scenarios:
        if name == "all":
            wanted.update(ALL)
        elif name in SUITES:
            wanted.update(SUITES[name])
        elif name in table:
            wanted.add(name)
        else:
            raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}, "
                             f"a suite ({', '.join(SUITES)}) or all")
    # Canonical order whatever the request's order, so one selection always gives one plan.
    chosen = [s for s in SCENARIOS if s in wanted]
    if not chosen:
        raise ValueError("no scenario chosen")
    ratios = tuple(r for name in chosen for r in table[name])
    runs = list(dict.fromkeys(run for r in ratios for run in r.runs))
    kinds = (PipelineRun, PeerRun, LlamaCppRun)
    ordered = [r for kind in kinds for r in runs if isinstance(r, kind)]
    return Plan(tuple(chosen), tuple(ordered), ratios)
