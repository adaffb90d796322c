"""The loaded-stage table: what each rank really holds, logged once every stage is built.

The plan table (before loading) shows the split by file bytes; this one shows, per rank, the
weight bytes resident after loading, the process's memory above its start, the routed experts
it holds (Mixture-of-Experts models), and which weights stay in their quantized blocks and
which were dequantized (and why), so a fallback is a visible notice rather than a silent 8x.
"""

from __future__ import annotations

import logging

import torch.distributed as dist

from ppinfer.model import PipelineStage
from ppinfer.pipeline.job import Job
from ppinfer.profiling.metrics import current_rss_bytes

log = logging.getLogger("ppinfer")
MIB = 1024.0 * 1024.0


def loaded_row(job: Job, stage: PipelineStage, baseline_rss: int) -> str:
    plan = stage.plan
    span = f"{plan.layer_start}-{plan.layer_end - 1}"
    above = max(current_rss_bytes() - baseline_rss, 0)
    how = stage.weights_report.describe() if stage.weights_report is not None else "-"
    row = f"{job.env.rank:>4}  {span:>9}  {stage.weight_bytes / MIB:>10.1f}  {above / MIB:>9.1f}  "
    if any(layer.moe is not None for layer in job.hparams.layers):
        row += f"experts: {stage.describe_experts()}; "
    return row + how


def log_loaded_stages(job: Job, stage: PipelineStage, baseline_rss: int) -> None:
    """Gather every rank's row to rank 0 and log the table there (a collective: every rank
    calls it, after the process group is up)."""
    mine = loaded_row(job, stage, baseline_rss)
    rows = [mine]
    if job.env.world > 1:
        rows = [None] * job.env.world
        dist.all_gather_object(rows, mine)
    if job.env.rank == 0:
        header = f"{'rank':>4}  {'layers':>9}  {'held MiB':>10}  {'RSS+ MiB':>9}  weights"
        log.info("loaded (runtime.weights=%s):\n%s", job.cfg.runtime.weights, "\n".join([header, *rows]))
