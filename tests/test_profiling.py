"""`profile=tensorboard`: the timeline rasteriser and PNG writer on hand-made input, the
per-step scalars on hand-derived timings, and a profiled 2-rank torchrun run whose event
files, traces, timeline.png and metrics.json are read back with independent readers
(TensorBoard's EventAccumulator, json, zlib, Pillow)."""

from __future__ import annotations

import gzip
import io
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_driver import Finished, Run, run_all, run_command, torchrun_command
from pipeline_models import ADD_BOS, PIPELINE_SPECS, TokenizerChoice, write_pipeline_model
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ppinfer.model.cache import KVCache, KVPool
from ppinfer.pipeline.job import DistEnv
from ppinfer.pipeline.profile import kv_cache_use, pack_spans
from ppinfer.pipeline.runtime import Span
from ppinfer.pipeline.work import ItemKind
from ppinfer.profiling import timeline
from ppinfer.profiling.tensorboard import finish_profile, make_tracer, step_series
from ppinfer.profiling.timeline import (
    BACKGROUND,
    LANE_COLOURS,
    ROW_BACKGROUND,
    TimelineLayout,
    encode_png,
    render_timeline,
)
from ppinfer.profiling.trace import NULL_TRACER

PREFILL, DECODE = int(ItemKind.PREFILL), int(ItemKind.DECODE)
LAUNCH_TIMEOUT_S = 180.0
PROMPTS = ("the cat in the hat", "pipelines keep every stage busy")
MAX_NEW = 8
ITEMS_PER_RANK = len(PROMPTS) * MAX_NEW
"""Each prompt is one lane: one prefill chunk (prompts are shorter than prefill_chunk=128)
that samples the first token, then MAX_NEW - 1 decode steps (ignore_eos)."""
RECORDED_STEPS = (2, 3, 4, 5)
"""profile=tensorboard's schedule: wait 1, warmup 1, active 4."""


# ---- PNG ------------------------------------------------------------------------------------


def read_png(data: bytes) -> np.ndarray:
    """Decode an 8-bit truecolour, non-interlaced PNG written without row filters, checking
    the signature, every chunk's CRC and the header fields on the way."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(tag + body) & 0xFFFFFFFF == crc, tag
        chunks.append((tag, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, compression, filtering, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for tag, body in chunks if tag == b"IDAT"))
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, 1 + 3 * width)
    assert (rows[:, 0] == 0).all()  # filter type "none" on every row
    return rows[:, 1:].reshape(height, width, 3)


def test_png_round_trip() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (7, 11, 3), dtype=np.uint8)
    data = encode_png(rgb)
    np.testing.assert_array_equal(read_png(data), rgb)
    # An independent decoder agrees.
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "RGB" and img.size == (11, 7)
        np.testing.assert_array_equal(np.asarray(img), rgb)


BAD_IMAGES = [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 3), np.float32),
              np.zeros((0, 4, 3), np.uint8)]


@pytest.mark.parametrize("bad", BAD_IMAGES)
def test_png_rejects_bad_arrays(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="encode_png"):
        encode_png(bad)


# ---- timeline -------------------------------------------------------------------------------


def test_prefill_kind_is_the_schedules() -> None:
    assert timeline.PREFILL_KIND == PREFILL


def lane_pixels(img: np.ndarray, y: int, colour: tuple[int, int, int]) -> np.ndarray:
    return np.flatnonzero((img[y] == colour).all(axis=1))


def test_timeline_pixels() -> None:
    """Stage 0: lane 0 decode over [0, 0.4) s, lane 1 prefill over [0.5, 1.0); stage 1:
    lane 2 decode over [0.2, 0.6). Ticks fall every 200 ms, so 0.45, 0.85 and 0.3 s are
    clear of grid lines."""
    tables = [
        np.array([[0.0, 0.4, 0, DECODE], [0.5, 1.0, 1, PREFILL]]),
        np.array([[0.2, 0.6, 2, DECODE]]),
    ]
    img = render_timeline(tables, width=1000)
    layout = TimelineLayout(n_stages=2, t_end=1.0, width=1000)
    assert img.shape == (layout.height, 1000, 3) and img.dtype == np.uint8

    def mid(stage: int) -> int:
        y0, y1 = layout.row(stage)
        return (y0 + y1) // 2

    def at(stage: int, t: float) -> tuple[int, ...]:
        return tuple(int(c) for c in img[mid(stage), layout.left + round(t * layout.plot_width)])

    assert at(0, 0.2) == LANE_COLOURS[0]
    assert at(1, 0.4) == LANE_COLOURS[2]
    prefill = np.array(at(0, 0.75))
    assert (prefill <= np.array(LANE_COLOURS[1])).all() and prefill.sum() < sum(LANE_COLOURS[1])  # darker shade
    assert at(0, 0.45) == ROW_BACKGROUND  # between spans: the stage's bubble
    assert at(1, 0.85) == ROW_BACKGROUND
    gap_row = layout.row(0)[1] + layout.row_gap // 2
    assert tuple(img[gap_row, layout.left + round(0.3 * layout.plot_width)]) == BACKGROUND
    # The lane-0 bar covers 40% of the plot width, to within the separator and rounding.
    covered = lane_pixels(img, mid(0), LANE_COLOURS[0])
    assert covered.min() == layout.left
    assert abs(len(covered) - 0.4 * layout.plot_width) <= 2


def test_timeline_short_span_stays_visible() -> None:
    tables = [np.array([[0.0, 10.0, 0, DECODE], [5.0, 5.0 + 1e-6, 1, DECODE]])]
    img = render_timeline(tables)
    layout = TimelineLayout(n_stages=1, t_end=10.0)
    y0, y1 = layout.row(0)
    assert len(lane_pixels(img, (y0 + y1) // 2, LANE_COLOURS[1])) >= 1


def test_timeline_rejects_bad_tables() -> None:
    with pytest.raises(ValueError, match="at least one stage"):
        render_timeline([])
    with pytest.raises(ValueError, match=r"stage 1: span table must be \[n, 4\]"):
        render_timeline([np.zeros((1, 4)), np.zeros((2, 3))])


# ---- scalars --------------------------------------------------------------------------------


def test_pack_spans() -> None:
    spans = [Span(10.5, 10.75, 1, ItemKind.PREFILL), Span(11.0, 11.5, 0, ItemKind.DECODE)]
    np.testing.assert_array_equal(pack_spans(spans, 10.0), [[0.5, 0.75, 1, PREFILL], [1.0, 1.5, 0, DECODE]])
    assert pack_spans([], 0.0).shape == (0, 4)


def test_step_series_hand_derived() -> None:
    """Loop starts at 10 s; step 0 ends at 10.1 s with an 80 ms span and 10 ms of send;
    step 1 ends at 10.25 s with a 50 ms span, 20 ms of recv and 50 ms waiting."""
    series = step_series(
        [10.1, 10.25],
        [{"send": 0.01, "layers": 0.07}, {"wait": 0.05, "recv": 0.02, "layers": 0.045}],
        np.array([[0.0, 0.08, 0, PREFILL], [0.15, 0.2, 0, DECODE]]),
        10.0,
    )
    expected = {
        "step/wall_ms": [100, 150], "step/compute_ms": [80, 50], "step/comm_ms": [10, 20],
        "step/idle_ms": [10, 80], "range/layers_ms": [70, 45], "range/send_ms": [10, 0],
        "range/recv_ms": [0, 20], "range/wait_ms": [0, 50],
    }
    assert set(series) == set(expected)
    for tag, values in expected.items():
        np.testing.assert_allclose(series[tag], values, atol=1e-9, err_msg=tag)


def test_kv_cache_use() -> None:
    """A block is 2 layers x (k, v) x [Hkv=2, 16 slots, D=4] x 2 bytes (float16) = 1024 bytes;
    a pool of 3 blocks. 2 tokens take one block, 17 more a second; resetting the row gives both
    back, and the peak stays 2 of the 3 blocks."""
    pool = KVPool(2, [2, 2], 4, n_blocks=3, dtype=torch.float16, device=torch.device("cpu"))
    lane = KVCache(pool, batch=1, max_len=48)
    lane.rows([0], torch.tensor([[0, 1]]))
    assert kv_cache_use(pool)["memory/kv_cache_used_bytes"] == 1024.0
    lane.rows([0], torch.arange(2, 19)[None])
    lane.reset()
    assert kv_cache_use(pool) == {
        "memory/kv_cache_allocated_bytes": 3072.0,
        "memory/kv_cache_used_bytes": 0.0,
        "memory/kv_cache_peak_used_bytes": 2048.0,
        "memory/kv_cache_used_fraction": pytest.approx(2 / 3),
        "memory/kv_cache_blocks": 3.0,
    }
    assert kv_cache_use(None)["memory/kv_cache_used_fraction"] == 0.0


def test_profiling_off_is_free(tmp_path: Path) -> None:
    """Off: the null tracer, no directory, and finishing touches nothing (its argument is
    unusable)."""
    tracer = make_tracer(False, tmp_path / "tb", 0, 1, 1, 4, cuda=False)
    assert tracer is NULL_TRACER
    assert not (tmp_path / "tb").exists()
    finish_profile(tracer, None)  # type: ignore[arg-type]


# ---- a profiled run -------------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    out: Path
    done: Finished

    @property
    def profile_dir(self) -> Path:
        return self.out / "tensorboard"


def overrides(model: Path, out: Path, profile: str) -> list[str]:
    prompts = "[" + ",".join(f"'{p}'" for p in PROMPTS) + "]"
    return [f"model.path={model}", f"output.dir={out}", f"profile={profile}", f"prompts={prompts}",
            f"generation.max_new_tokens={MAX_NEW}", "generation.ignore_eos=true"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("profiling") / "llama.gguf"
    return write_pipeline_model(path, PIPELINE_SPECS["llama"], TokenizerChoice(add_bos=ADD_BOS["llama"]))


@pytest.fixture(scope="module")
def launch(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Launch:
    """The real entry point: `torchrun --nproc_per_node=2 launch/infer.py ... profile=tensorboard`."""
    out = tmp_path_factory.mktemp("profiled")
    args = overrides(tiny_model, out, "tensorboard")
    cmd = torchrun_command("--standalone", "--nproc_per_node=2", "launch/infer.py", *args)
    return Launch(out, run_command(cmd, LAUNCH_TIMEOUT_S))


def events(launch: Launch, rank: int) -> EventAccumulator:
    files = list((launch.profile_dir / f"rank{rank}").glob("events.out.tfevents.*"))
    assert len(files) == 1, files
    acc = EventAccumulator(str(files[0]), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def results(out: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_profiled_run_succeeds_with_unchanged_tokens(launch: Launch, tiny_model: Path, tmp_path: Path) -> None:
    """Profiling must not change behaviour: the greedy tokens equal an unprofiled run's."""
    assert launch.done.returncode == 0, launch.done.tail()
    reference = tmp_path / "unprofiled"
    run_all([Run("unprofiled", tuple(overrides(tiny_model, reference, "off")))], DistEnv(0, 1, 0, 1))
    assert not (reference / "tensorboard").exists() and not (reference / "timeline.png").exists()
    assert [r["token_ids"] for r in results(launch.out)] == [r["token_ids"] for r in results(reference)]


@pytest.mark.slow
def test_event_files_per_rank(launch: Launch) -> None:
    assert launch.done.returncode == 0, launch.done.tail()
    step_tags = {"step/wall_ms", "step/compute_ms", "step/comm_ms", "step/idle_ms", "range/layers_ms", "range/send_ms"}
    summary_tags = {"stage/compute_s", "stage/comm_s", "stage/idle_s", "stage/bubble_fraction",
                    "memory/peak_rss_bytes", "memory/kv_cache_allocated_bytes", "memory/kv_cache_used_fraction"}
    throughput = {
        "throughput/prefill_tokens_per_s",
        "throughput/decode_tokens_per_s",
        "throughput/time_to_first_token_s",
        "kv_cache/preemptions",
    }
    # Throughput on the rank that writes output.dir: the first, where the sampled ids arrive.
    per_rank = {0: {"range/embed_ms", "range/wait_ms", *throughput},
                1: {"range/recv_ms", "range/lm_head_ms", "range/sample_ms"}}
    for rank in (0, 1):
        acc = events(launch, rank)
        tags = set(acc.Tags()["scalars"])
        assert step_tags | summary_tags | per_rank[rank] <= tags, sorted(tags)
        for tag in step_tags:
            assert [e.step for e in acc.Scalars(tag)] == list(range(ITEMS_PER_RANK)), tag
        compute = np.array([e.value for e in acc.Scalars("step/compute_ms")])
        wall = np.array([e.value for e in acc.Scalars("step/wall_ms")])
        idle = np.array([e.value for e in acc.Scalars("step/idle_ms")])
        assert (compute > 0).all() and (idle >= 0).all() and (wall >= compute - 1e-3).all()
        assert 0.0 <= acc.Scalars("stage/bubble_fraction")[0].value <= 1.0
        assert acc.Scalars("memory/peak_rss_bytes")[0].value > 0
        assert acc.Scalars("memory/kv_cache_allocated_bytes")[0].value > 0
    writer = events(launch, 0)
    assert writer.Scalars("throughput/decode_tokens_per_s")[0].value > 0
    assert writer.Tags()["images"] == ["pipeline/timeline"]
    assert "throughput/decode_tokens_per_s" not in events(launch, 1).Tags()["scalars"]
    assert events(launch, 1).Tags()["images"] == []


@pytest.mark.slow
def test_traces_per_rank(launch: Launch) -> None:
    assert launch.done.returncode == 0, launch.done.tail()
    # A decode step travels inline with its header, so receiving it is the "wait" range.
    expected = {0: {"embed", "layers", "send", "wait"}, 1: {"wait", "layers", "lm_head", "sample", "send"}}
    for rank in (0, 1):
        files = list(launch.profile_dir.glob(f"rank{rank}.*.pt.trace.json*"))
        assert len(files) == 1, files
        raw = files[0].read_bytes()
        trace = json.loads(gzip.decompress(raw) if files[0].suffix == ".gz" else raw)
        names = {e.get("name") for e in trace["traceEvents"]}
        assert expected[rank] <= names, sorted(n for n in names if isinstance(n, str) and not n.startswith("aten::"))
        assert {f"ProfilerStep#{s}" for s in RECORDED_STEPS} <= names
        assert any(isinstance(n, str) and n.startswith("aten::") for n in names)  # the ops inside the ranges


@pytest.mark.slow
def test_timeline_png(launch: Launch) -> None:
    assert launch.done.returncode == 0, launch.done.tail()
    img = read_png((launch.out / "timeline.png").read_bytes())
    assert img.shape[1] == 1200
    layout = TimelineLayout(n_stages=2, t_end=1.0)  # rows do not depend on the time scale
    assert img.shape[0] == layout.height
    seen: set[int] = set()
    for stage in (0, 1):
        y0, y1 = layout.row(stage)
        band = img[y0:y1].reshape(-1, 3)
        lanes = {lane for lane, colour in enumerate(LANE_COLOURS[: len(PROMPTS)]) if (band == colour).all(axis=1).any()}
        assert lanes, f"stage {stage} has no decode bar"  # every rank's spans reached the writer
        seen |= lanes
    assert len(seen) >= 2  # both lanes, in distinct colours
    # TensorBoard holds the same picture.
    stored = events(launch, 0).Images("pipeline/timeline")[0].encoded_image_string
    with Image.open(io.BytesIO(stored)) as tb_img:
        np.testing.assert_array_equal(np.asarray(tb_img.convert("RGB")), img)


@pytest.mark.slow
def test_metrics_sane(launch: Launch) -> None:
    assert launch.done.returncode == 0, launch.done.tail()
    metrics = json.loads((launch.out / "metrics.json").read_text())
    assert metrics["prefill_tokens_per_s"] > 0 and metrics["decode_tokens_per_s"] > 0
    assert len(metrics["per_stage"]) == 2
    for stage in metrics["per_stage"]:
        assert stage["compute_s"] > 0
        assert 0.0 <= stage["bubble_fraction"] <= 1.0
        assert stage["peak_rss_bytes"] > 0
