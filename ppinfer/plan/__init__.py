"""Which layers each stage holds: `StagePlan` (the one place stage-ness is decided), the
layer allocation policies and the cost model they use. Pure functions over the file's
metadata, so the config can check a layer list before anything is loaded."""

from ppinfer.plan.allocation import LayerCosts, allocate, parse_layers, plan_table
from ppinfer.plan.costs import layer_costs
from ppinfer.plan.stage_plan import StagePlan

__all__ = ["LayerCosts", "StagePlan", "allocate", "layer_costs", "parse_layers", "plan_table"]
