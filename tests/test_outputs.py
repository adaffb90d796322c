"""`output.dir`, in-process: the checks before a run, the writing rank's lock, the clearing of
an earlier run's files, whole lines on a full disk, file modes, and the end of one-rank runs
through `ppinfer.pipeline.batch.run` (the multi-rank cases are in test_reliability.py)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest
from pipeline_driver import compose_config
from pipeline_models import PIPELINE_SPECS, write_pipeline_model

from ppinfer.pipeline import batch, failures, outputs
from ppinfer.pipeline.outputs import OutputDir, OutputDirError, ResultsWriter

REPO = Path(__file__).resolve().parent.parent
LONG_NAME = "d" * 300  # longer than any file system's NAME_MAX (255)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pipeline_model(tmp_path_factory.mktemp("model") / "tiny.gguf", PIPELINE_SPECS["llama"])


@pytest.fixture
def umask_027() -> Iterator[int]:
    """A umask other than the usual 022, so that a mode that ignores it shows."""
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _run(model: Path, out_dir: Path, *overrides: str) -> int:
    """One rank, no process group, as `launch/infer.py` would run it."""
    args = (f"model.path={model}", f"output.dir={out_dir}", "runtime.device=cpu", "runtime.threads=1", *overrides)
    return batch.run(compose_config(args), environ={}, overrides=args)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "] error: " in line]


class _FailingFile:
    """results.jsonl on a disk whose `fail_on`-th write lands half of its data and then raises
    `error`, as a write does when the disk fills up (or Ctrl-C arrives) in the middle of it.
    With `late`, all of the data lands and the error comes from the flush after it (Ctrl-C
    right after the write)."""

    def __init__(self, fh: IO[bytes], disk: _FailingDisk) -> None:
        self._fh, self._disk = fh, disk

    def write(self, data: bytes) -> int:
        self._disk.writes += 1
        if self._disk.writes != self._disk.fail_on:
            return self._fh.write(data)
        if self._disk.late:
            self._disk.fail_at_flush = True
            return self._fh.write(data)
        self._fh.write(data[: len(data) // 2])
        self._fh.flush()
        raise self._disk.error

    def flush(self) -> None:
        self._fh.flush()
        if self._disk.fail_at_flush:
            self._disk.fail_at_flush = False
            raise self._disk.error

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)

    def __enter__(self) -> _FailingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()


class _FailingDisk:
    """Stands in for `open` in `ppinfer.pipeline.outputs` (see `_FailingFile`)."""

    def __init__(self, fail_on: int, error: BaseException, late: bool = False) -> None:
        self.fail_on, self.error, self.late = fail_on, error, late
        self.writes, self.fail_at_flush = 0, False

    def __call__(self, path: Path, mode: str = "r", *args: Any, **kwargs: Any) -> IO[Any]:
        fh = open(path, mode, *args, **kwargs)  # noqa: SIM115  (returned to the caller)
        return _FailingFile(fh, self) if Path(path).name == "results.jsonl" else fh  # type: ignore[return-value]


ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _record(index: int) -> dict[str, Any]:
    """Each record's line is longer than the one before (the text grows by 10 characters)."""
    return {"index": index, "prompt": f"prompt {index}", "text": "é" * 10 * (index + 1)}


def _line(index: int) -> bytes:
    return (json.dumps(_record(index), ensure_ascii=False) + "\n").encode("utf-8")


# ---- the checks before a run ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["/proc/ppinfer-test", f"{{tmp}}/{LONG_NAME}", f"{{tmp}}/{LONG_NAME}/sub"])
def test_an_output_dir_that_cannot_be_made_is_one_line(tmp_path: Path, name: str) -> None:
    """/proc accepts no new directory even for root (whom `os.access` tells it is writable);
    a 300-character name is too long anywhere. The command line check, which runs before
    Hydra would create the directory with a traceback, says so in one line naming it."""
    out_dir = name.format(tmp=tmp_path)
    line = failures.command_line_problem(REPO / "conf", "config", [f"output.dir={out_dir}"])
    assert line is not None and line.startswith(f"output.dir={out_dir}: ") and "\n" not in line


def test_the_command_line_check_makes_a_usable_output_dir(tmp_path: Path) -> None:
    out_dir = tmp_path / "a" / "b"
    assert failures.command_line_problem(REPO / "conf", "config", [f"output.dir={out_dir}"]) is None
    assert out_dir.is_dir()


# ---- the writing rank's lock and the earlier run's files -------------------------------------


def test_a_held_output_dir_is_refused_and_left_alone(tmp_path: Path) -> None:
    first = OutputDir.claim(tmp_path)
    try:
        (tmp_path / "results.jsonl").write_text('{"index": 0}\n')
        with pytest.raises(OutputDirError) as refused:
            OutputDir.claim(tmp_path)
        message = str(refused.value)
        assert message.startswith(f"output.dir={tmp_path}: in use by another run (pid {os.getpid()} on ")
        assert (tmp_path / "results.jsonl").read_text() == '{"index": 0}\n'
    finally:
        first.release()
    OutputDir.claim(tmp_path).release()  # free again once the first run let go


def test_a_killed_run_leaves_no_lock_behind(tmp_path: Path) -> None:
    """The lock is the holder process's flock: gone with the process, whatever killed it."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from ppinfer.pipeline.outputs import OutputDir;"
         " held = OutputDir.claim(Path(sys.argv[1])); print('held', flush=True); sys.stdin.read()", str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(OutputDirError, match="in use by another run"):
            OutputDir.claim(tmp_path)
    finally:
        holder.kill()
        holder.communicate()
    OutputDir.claim(tmp_path).release()


def test_claiming_removes_an_earlier_runs_files_only(tmp_path: Path) -> None:
    earlier = ["results.jsonl", "logits.npy", "metrics.json", "timeline.png", ".metrics.json.4242.tmp",
               "tensorboard/rank0.123.pt.trace.json", "tensorboard/rank3/events.out.tfevents.1.host"]
    mine = ["notes.txt", "results.jsonl.bak", "tensorboard/README", ".other.tmp"]
    for name in earlier + mine:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    OutputDir.claim(tmp_path).release()
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == sorted([".lock", *mine])


# ---- whole lines on a full disk ---------------------------------------------------------------


@pytest.mark.parametrize(
    "error, late, kept",
    [(ENOSPC, False, 2), (KeyboardInterrupt(), False, 2), (KeyboardInterrupt(), True, 3)],
    ids=["disk full", "interrupted mid-write", "interrupted after the write"],
)
def test_a_failed_write_leaves_whole_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException, late: bool, kept: int
) -> None:
    """Lines 1 and 2 go in one write that fails halfway, which is past the end of line 1 (it is
    the shorter one): line 1 stays, the part of line 2 goes. A failure after the write keeps
    both."""
    writer = ResultsWriter(tmp_path)
    monkeypatch.setattr(outputs, "open", _FailingDisk(fail_on=2, error=error, late=late), raising=False)
    assert writer.add(0, _record(0)) == [_record(0)]
    assert writer.add(2, _record(2)) == []  # waits for 1
    with pytest.raises((OutputDirError, KeyboardInterrupt)) as failed:
        writer.add(1, _record(1))
    assert (tmp_path / "results.jsonl").read_bytes() == b"".join(_line(i) for i in range(kept))
    if isinstance(error, OSError):
        assert str(failed.value) == f"output.dir={tmp_path}: no space left on device (writing results.jsonl)"


def test_other_write_errors_name_output_dir() -> None:
    error = OSError(errno.EIO, os.strerror(errno.EIO))
    assert outputs.write_problem(Path("out"), "metrics.json", error) == (
        "output.dir=out: cannot write metrics.json (Input/output error)"
    )


def test_a_full_disk_ends_the_run_with_one_line(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three sequences in three waves; the disk fills while the second one's line is written:
    the run ends with exit code 2 and one line, the first line is kept whole, and the metrics
    of an earlier run in the directory are gone (not left beside the new results)."""
    (tmp_path / "metrics.json").write_text('{"task": "an earlier run"}')
    monkeypatch.setattr(outputs, "open", _FailingDisk(fail_on=2, error=ENOSPC), raising=False)
    code = _run(model, tmp_path, "prompts=[one,two,three]", "pipeline.lane_size=1", "generation.max_new_tokens=3")
    assert code == failures.EXIT_BAD_INPUT
    errors = _error_lines(capsys.readouterr().err)
    assert errors == [f"[ppinfer rank 0] error: output.dir={tmp_path}: no space left on device (writing results.jsonl)"]
    lines = (tmp_path / "results.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) == 1 and lines[0].endswith("\n") and json.loads(lines[0])["prompt"] == "one"
    assert not (tmp_path / "metrics.json").exists()


# ---- modes, and a score run in a directory an earlier generate run used ----------------------


def test_output_files_follow_the_umask(tmp_path: Path, umask_027: int) -> None:
    ResultsWriter(tmp_path).add(0, _record(0))
    outputs.write_json_atomic(tmp_path / "metrics.json", {"a": 1})
    outputs.write_logits(tmp_path, np.zeros((2, 3), np.float32))
    modes = {name: _mode(tmp_path / name) for name in ("results.jsonl", "metrics.json", "logits.npy")}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask_027)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_scoring_one_token_replaces_an_earlier_run(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], umask_027: int
) -> None:
    """A score run where a generate run was: its results.jsonl goes, logits.npy and
    metrics.json are this run's, with the same mode; one token has no perplexity, and the
    console says so instead of printing nan."""
    (tmp_path / "results.jsonl").write_text('{"index": 0}\n')
    (tmp_path / "metrics.json").write_text('{"task": "generate"}')
    assert _run(model, tmp_path, "task=score", "input.token_ids=[5]") == 0
    done = [line for line in capsys.readouterr().err.splitlines() if "done: scored" in line]
    assert len(done) == 1 and "perplexity n/a" in done[0] and "nan" not in done[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "logits.npy", "metrics.json"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["task"] == "score" and metrics["scored_tokens"] == 1 and "perplexity" not in metrics
    assert np.load(tmp_path / "logits.npy").shape == (1, PIPELINE_SPECS["llama"].n_vocab)
    assert _mode(tmp_path / "metrics.json") == _mode(tmp_path / "logits.npy") == 0o666 & ~umask_027


def test_a_refused_run_writes_nothing(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    held = OutputDir.claim(tmp_path)
    try:
        (tmp_path / "results.jsonl").write_text('{"index": 0}\n')
        assert _run(model, tmp_path, "prompts=[one]", "generation.max_new_tokens=2") == failures.EXIT_BAD_INPUT
    finally:
        held.release()
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and f"output.dir={tmp_path}: in use by another run" in errors[0]
    assert (tmp_path / "results.jsonl").read_text() == '{"index": 0}\n'
