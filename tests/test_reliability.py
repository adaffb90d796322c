"""Every bad input and every failed rank ends the whole torchrun job quickly and cleanly.

- A table of bad inputs (config values, model files, prompts), each launched as a real
  2-rank torchrun job: the job exits non-zero within `JOB_LIMIT_S` with no process left,
  ppinfer prints exactly one error line naming the bad value, and no rank prints a
  traceback.
- kill -9 of the middle rank of a 3-stage run mid-decode: every process is gone within
  `JOB_LIMIT_S`, torchrun names that rank as the root cause, and every sequence completed
  before the kill is still in results.jsonl, unchanged.
- A rank that raises mid-decode: one traceback (its own), and torchrun names it.
- A rank that hangs mid-decode: the others give up after `runtime.timeout_s`.
- The same kill without torchrun's agent (as on a node whose agent cannot see the dead
  rank): the survivors notice on their own and exit.
- A run into the `output.dir` of a run in progress is refused; Ctrl-C ends a run with one
  line and keeps its finished results (more on `output.dir` in test_outputs.py).
- The reporting helpers in `ppinfer.pipeline.failures`, in-process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QType
from ggufgen import RawTensor, encoded_tensors, with_changes, write_gguf
from hydra.errors import OverrideParseException
from pipeline_models import PIPELINE_SPECS, TokenizerChoice, _copy_with_tokenizer, write_pipeline_model
from torchrun_job import ENTRY, REPO, JobResult, run_job, worker_pids

from ppinfer.pipeline import failures
from ppinfer.pipeline.job import DistEnv
from ppinfer.pipeline.outputs import OutputDir, OutputDirError

JOB_LIMIT_S = 30.0
"""The whole job, launch included, must be over within this."""
FAULTY_ENTRY = REPO / "tests" / "faulty_infer.py"

SPEC = PIPELINE_SPECS["llama"]  # 6 layers, context 128, 262-token byte vocabulary


@dataclass(frozen=True)
class BadInput:
    """One row of the table: overrides that make the job fail, and what the message names.
    `{name}` in an override or an expected string is replaced by the path of file `name`."""

    case: str
    overrides: tuple[str, ...]
    names: tuple[str, ...]


BAD_INPUTS = [
    # config (one job per way a config error arises; the bounds of each value: test_config.py)
    BadInput("misspelt key", ("generation.top_pp=0.5",), ("generation.top_pp",)),
    BadInput("layer list sum", ("pipeline.layers=[2,2]",), ("pipeline.layers=[2, 2]", "6 layers")),
    BadInput("layer list length", ("pipeline.layers=[2,2,2]",), ("pipeline.layers=[2, 2, 2]", "2 stages")),
    BadInput("stages > layers", ("model.path={one_layer}",), ("2 pipeline stages", "1 layers")),
    BadInput(
        "prompt + max_new_tokens > context",
        ("prompts=['" + "a long prompt " * 6 + "']", "generation.max_new_tokens=64"),
        ("generation.max_new_tokens=64", "context of 128"),
    ),
    BadInput("cuda without a GPU", ("runtime.device=cuda",), ("runtime.device='cuda'",)),
    BadInput("unknown dtype", ("runtime.dtype=float8",), ("runtime.dtype='float8'",)),
    BadInput(
        "output dir under a file", ("output.dir={not_gguf}/out",), ("output.dir={not_gguf}/out", "not a directory")
    ),
    BadInput("output dir under /proc", ("output.dir=/proc/ppinfer-test",), ("output.dir=/proc/ppinfer-test",)),
    BadInput("output dir name too long", ("output.dir={folder}/" + "d" * 300,), ("{folder}/" + "d" * 300,)),
    # model file
    BadInput("missing model", ("model.path={folder}/nowhere.gguf",), ("{folder}/nowhere.gguf", "not found")),
    BadInput("unreadable model", ("model.path={folder}",), ("{folder}", "not a regular file")),
    BadInput("not GGUF", ("model.path={not_gguf}",), ("{not_gguf}", "not a GGUF file")),
    BadInput("wrong version", ("model.path={version_7}",), ("{version_7}", "version 7")),
    BadInput("truncated", ("model.path={truncated}",), ("{truncated}", "truncated")),
    BadInput("unsupported architecture", ("model.path={alien}",), ("{alien}", "alienlm", "llama", "gemma3", "qwen2")),
    BadInput("missing tensor (last stage)", ("model.path={no_tensor}",), ("{no_tensor}", "blk.5.ffn_down.weight")),
    BadInput("mis-shaped tensor", ("model.path={bad_shape}",), ("{bad_shape}", "blk.1.attn_k.weight", "[48, 64]")),
    BadInput("unsupported tensor type", ("model.path={q8_1}",), ("{q8_1}", "blk.4.ffn_up.weight", "Q8_1")),
    # prompts
    BadInput("empty prompt list", ("prompts=[]",), ("prompts", "no prompts")),
    BadInput("unreadable prompts file", ("prompts_file={folder}",), ("prompts_file={folder}", "cannot read")),
    BadInput("malformed jsonl line", ("prompts_file={bad_jsonl}",), ("prompts_file={bad_jsonl}", "line 3")),
    BadInput(
        "token id outside the vocabulary",
        ("task=score", "input.token_ids=[5,7,4000]"),
        ("input.token_ids", "4000", "[0, 262)"),
    ),
]


def _tokenized(path: Path, tensors: dict[str, np.ndarray | RawTensor]) -> Path:
    """`tensors` written with SPEC's metadata, then with the test tokenizer added."""
    weights = write_gguf(path.with_suffix(".weights"), SPEC, tensors)
    _copy_with_tokenizer(weights, path, SPEC.arch, TokenizerChoice())
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every file the table refers to, by name."""
    folder = tmp_path_factory.mktemp("bad")
    good = write_pipeline_model(folder / "tiny.gguf", SPEC)
    raw = good.read_bytes()
    out = {"folder": folder, "good": good}
    out["one_layer"] = write_pipeline_model(folder / "one.gguf", with_changes(SPEC, n_layer=1))
    out["not_gguf"] = folder / "random.gguf"
    out["not_gguf"].write_bytes(np.random.default_rng(0).bytes(4096))
    out["version_7"] = folder / "v7.gguf"
    out["version_7"].write_bytes(raw[:4] + (7).to_bytes(4, "little") + raw[8:])
    out["truncated"] = folder / "cut.gguf"
    out["truncated"].write_bytes(raw[: len(raw) * 2 // 3])
    out["alien"] = write_gguf(folder / "alien.gguf", SPEC, encoded_tensors(SPEC), arch_name="alienlm")
    tensors = encoded_tensors(SPEC)
    del tensors["blk.5.ffn_down.weight"]
    out["no_tensor"] = _tokenized(folder / "no_tensor.gguf", tensors)
    tensors = encoded_tensors(SPEC)
    tensors["blk.1.attn_k.weight"] = np.zeros((SPEC.kv_width + 16, SPEC.n_embd), np.float32)
    out["bad_shape"] = _tokenized(folder / "bad_shape.gguf", tensors)
    block, type_size = GGML_QUANT_SIZES[QType.Q8_1]
    q8_1 = np.random.default_rng(1).integers(0, 256, (SPEC.n_ff, SPEC.n_embd // block * type_size), dtype=np.uint8)
    tensors = encoded_tensors(SPEC)
    tensors["blk.4.ffn_up.weight"] = RawTensor(q8_1, QType.Q8_1)
    out["q8_1"] = _tokenized(folder / "q8_1.gguf", tensors)
    out["bad_jsonl"] = folder / "prompts.jsonl"
    out["bad_jsonl"].write_text('"fine"\n{"prompt": "also fine"}\n{"prompt": "broken\n')
    return out


def _fill(text: str, files: dict[str, Path]) -> str:
    return text.format(**{name: str(path) for name, path in files.items()})


def _run_bad_input(row: BadInput, files: dict[str, Path]) -> JobResult:
    overrides = [f"model.path={files['good']}", f"output.dir={files['folder']}/out-{BAD_INPUTS.index(row)}"]
    overrides += [_fill(o, files) for o in row.overrides]  # a later override wins
    return run_job(2, overrides, JOB_LIMIT_S + 15)


def _problems(row: BadInput, result: JobResult, files: dict[str, Path]) -> list[str]:
    """What is wrong with how the job ended (empty when it ended as it should)."""
    problems = []
    if result.returncode == 0:
        problems.append("the job exited 0")
    if result.seconds >= JOB_LIMIT_S:
        problems.append(f"the job took {result.seconds:.1f} s")
    if result.leftovers:
        problems.append(f"processes left running: {result.leftovers}")
    errors = result.error_lines()
    if len(errors) != 1:
        problems.append(f"{len(errors)} ppinfer error lines instead of one: {errors}")
    missing = [_fill(n, files) for n in row.names if _fill(n, files) not in " ".join(errors)]
    if missing:
        problems.append(f"the message does not name {missing}")
    if result.project_frames():
        problems.append(f"a rank printed a traceback: {result.project_frames()}")
    return problems


@pytest.mark.slow
def test_bad_inputs_end_the_job(files: dict[str, Path]) -> None:
    """The whole table; two jobs at a time (a job is mostly interpreter start-up)."""
    if torch.cuda.is_available():
        pytest.skip("the table expects a machine without a GPU (runtime.device=cuda must fail)")
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda row: _run_bad_input(row, files), BAD_INPUTS))
    report = []
    for row, result in zip(BAD_INPUTS, results):
        problems = _problems(row, result, files)
        if problems:
            tail = "\n    ".join(result.output.splitlines()[-12:])
            report.append(f"{row.case}: {'; '.join(problems)}\n    {tail}")
    assert len(BAD_INPUTS) >= 15
    assert not report, "\n".join(report)


# ---- a rank killed mid-decode ---------------------------------------------------------------

KILL_PROMPTS = [f"prompt {i}: " + "abc " * (i % 5) for i in range(24)]
KILL_NEW_TOKENS = 90  # the longest prompt has 27 tokens; the context is 128


def _kill_overrides(model: Path, out_dir: Path) -> list[str]:
    """3 stages, 3 lanes of one sequence each, 24 sequences of 90 tokens: eight waves, so
    some sequences finish long before the last ones."""
    return [
        f"model.path={model}", f"output.dir={out_dir}", "runtime.device=cpu", "runtime.threads=1",
        "pipeline.layers=[2,2,2]", "pipeline.microbatches=3", "pipeline.lane_size=1",
        f"generation.max_new_tokens={KILL_NEW_TOKENS}", "generation.ignore_eos=true",
        "prompts=[" + ",".join(f"'{p}'" for p in KILL_PROMPTS) + "]",
    ]


def _result_lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True) if path.exists() else []


def _wait_for_results(results: Path, proc: subprocess.Popen[str], timeout_s: float) -> list[str]:
    """The whole lines of results.jsonl once there is at least one (empty on timeout)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        lines = [line for line in _result_lines(results) if line.endswith("\n")]
        if lines:
            return lines
        time.sleep(0.05)
    return []


@pytest.mark.slow
def test_kill_middle_rank_mid_decode(files: dict[str, Path]) -> None:
    out_dir = files["folder"] / "killed"
    results = out_dir / "results.jsonl"
    seen: dict[str, Any] = {}

    def kill_rank_1(proc: subprocess.Popen[str]) -> None:
        seen["before"] = _wait_for_results(results, proc, 60.0)
        ranks = worker_pids(psutil.Process(proc.pid))
        seen["ranks"] = sorted(ranks)
        if seen["before"] and 1 in ranks:
            os.kill(ranks[1], signal.SIGKILL)
            seen["killed_at"] = time.monotonic()

    result = run_job(3, _kill_overrides(files["good"], out_dir), 120.0, while_running=kill_rank_1)
    assert seen["before"], f"no sequence completed before the job ended:\n{result.output[-3000:]}"
    assert "killed_at" in seen, f"rank 1 not found among the workers {seen['ranks']}"
    gone_after = time.monotonic() - seen["killed_at"]
    assert result.returncode != 0
    assert gone_after < JOB_LIMIT_S, f"the job took {gone_after:.1f} s to end after the kill"
    assert not result.leftovers, f"processes left running: {result.leftovers}"
    after = _result_lines(results)
    before = seen["before"]
    assert len(before) < len(KILL_PROMPTS), "the job finished before the kill; nothing was tested"
    assert after[: len(before)] == before, "completed sequences changed or vanished"
    for index, line in enumerate(after):
        record = json.loads(line)  # every line is whole
        assert record["index"] == index and record["prompt"] == KILL_PROMPTS[index]
        assert len(record["token_ids"]) == KILL_NEW_TOKENS and record["finish_reason"] == "length"
    root_cause = result.output.split("Root Cause")[-1]
    assert "rank      : 1 " in root_cause and "SIGKILL" in root_cause, result.output[-3000:]
    assert not result.project_frames(), f"a rank printed a traceback:\n{result.output[-3000:]}"


@pytest.mark.slow
def test_a_rank_that_raises_ends_the_job(files: dict[str, Path]) -> None:
    """Rank 1 of 3 raises in its 40th computation (mid-decode): its traceback is printed once,
    torchrun names it as the root cause with the exception's message, and nothing is left."""
    args = ["1", "40", "raise", *_kill_overrides(files["good"], files["folder"] / "raised")]
    result = run_job(3, args, JOB_LIMIT_S + 15, script=FAULTY_ENTRY)
    assert result.returncode != 0
    assert result.seconds < JOB_LIMIT_S
    assert not result.leftovers, f"processes left running: {result.leftovers}"
    lines = result.output.splitlines()
    assert lines.count("RuntimeError: injected fault") == 1, "one traceback, from the rank that raised"
    root_cause = result.output.split("Root Cause")[-1]
    assert "rank      : 1 " in root_cause and "RuntimeError: injected fault" in root_cause, result.output[-3000:]


@pytest.mark.slow
def test_a_hung_rank_is_bounded_by_the_timeout(files: dict[str, Path]) -> None:
    """Rank 1 of 3 stops responding mid-decode (alive, so torchrun sees nothing wrong): the
    ranks waiting on it give up after `runtime.timeout_s` and end the job, one line each."""
    args = ["1", "40", "hang", *_kill_overrides(files["good"], files["folder"] / "hung"), "runtime.timeout_s=5"]
    result = run_job(3, args, JOB_LIMIT_S + 15, script=FAULTY_ENTRY)
    assert result.returncode != 0
    assert result.seconds < JOB_LIMIT_S
    assert not result.leftovers, f"processes left running: {result.leftovers}"
    lost = [line for line in result.output.splitlines() if "lost contact" in line]
    assert any("Timed out" in line for line in lost), result.output[-3000:]
    assert not result.project_frames(), f"a rank printed a traceback:\n{result.output[-3000:]}"


@pytest.mark.slow
def test_survivors_exit_on_their_own_without_an_agent(files: dict[str, Path]) -> None:
    """Three plain processes (no torchrun agent to tear them down): after rank 1 is killed,
    ranks 0 and 2 find out from gloo and exit with `EXIT_PEER_LOST`, one line each."""
    out_dir = files["folder"] / "no-agent"
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="3",
               LOCAL_WORLD_SIZE="3", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = [
        subprocess.Popen(
            [sys.executable, str(ENTRY), *_kill_overrides(files["good"], out_dir)], cwd=REPO,
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        for r in range(3)
    ]
    try:
        assert _wait_for_results(out_dir / "results.jsonl", procs[2], 60.0), "no sequence completed"
        procs[1].kill()
        killed_at = time.monotonic()
        outputs = [p.communicate(timeout=JOB_LIMIT_S)[0] for p in (procs[0], procs[2])]
        seconds = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert seconds < JOB_LIMIT_S
    assert [procs[0].returncode, procs[2].returncode] == [failures.EXIT_PEER_LOST] * 2, outputs
    for rank, output in zip((0, 2), outputs):
        lost = [line for line in output.splitlines() if "lost contact" in line]
        assert len(lost) == 1 and f"rank {rank} " in lost[0], output
        assert "Traceback" not in output, output


@pytest.mark.slow
def test_a_busy_output_dir_is_refused(files: dict[str, Path]) -> None:
    """A second run into the directory of a run in progress (this test holds its lock, as that
    run's writing rank does): one line, exit code 2, every rank gone quickly, and the first
    run's results untouched."""
    out_dir = files["folder"] / "busy"
    first_run = OutputDir.claim(out_dir)
    (out_dir / "results.jsonl").write_text('{"index": 0}\n')
    try:
        args = [f"model.path={files['good']}", f"output.dir={out_dir}", "runtime.device=cpu"]
        result = run_job(2, args, JOB_LIMIT_S + 15)
    finally:
        first_run.release()
    row = BadInput("busy output dir", (), (f"output.dir={out_dir}: in use by another run (pid {os.getpid()}",))
    problems = _problems(row, result, files)
    assert not problems, f"{problems}\n{result.output[-3000:]}"
    assert "exitcode  : 2 " in result.output.split("Root Cause")[-1], result.output[-3000:]
    assert (out_dir / "results.jsonl").read_text() == '{"index": 0}\n'


@pytest.mark.slow
def test_ctrl_c_ends_the_job_with_one_line(files: dict[str, Path]) -> None:
    """SIGINT to torchrun, as a terminal's Ctrl-C sends it, mid-decode: torchrun passes it on
    to every rank; ppinfer says "interrupted" once, no rank prints a traceback, nothing is
    left running, and every sequence completed before is in results.jsonl, whole."""
    out_dir = files["folder"] / "interrupted"
    results = out_dir / "results.jsonl"
    seen: dict[str, Any] = {}

    def ctrl_c(proc: subprocess.Popen[str]) -> None:
        seen["before"] = _wait_for_results(results, proc, 60.0)
        os.killpg(proc.pid, signal.SIGINT)
        seen["interrupted_at"] = time.monotonic()

    result = run_job(3, _kill_overrides(files["good"], out_dir), 120.0, while_running=ctrl_c)
    assert seen["before"], f"no sequence completed before the job ended:\n{result.output[-3000:]}"
    gone_after = time.monotonic() - seen["interrupted_at"]
    assert result.returncode != 0
    assert gone_after < JOB_LIMIT_S, f"the job took {gone_after:.1f} s to end after Ctrl-C"
    assert not result.leftovers, f"processes left running: {result.leftovers}"
    said = [line for line in result.output.splitlines()
            if line.startswith("[ppinfer rank") and any(w in line for w in ("interrupted", " error: ", "lost contact"))]
    assert said == ["[ppinfer rank 2] interrupted"], result.output[-3000:]
    assert "KeyboardInterrupt" not in result.output and not result.project_frames(), result.output[-3000:]
    after = _result_lines(results)
    assert after[: len(seen["before"])] == seen["before"]
    for index, line in enumerate(after):
        record = json.loads(line)  # every line is whole
        assert record["index"] == index and len(record["token_ids"]) == KILL_NEW_TOKENS


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---- the reporting helpers, in-process ------------------------------------------------------


def test_rank_0_reports_at_once_and_the_others_after_the_grace(tmp_path: Path) -> None:
    waits: list[float] = []
    error_file = tmp_path / "error.json"
    environ = {"TORCHELASTIC_ERROR_FILE": str(error_file)}
    code = failures.report_bad_input(DistEnv(0, 2, 0, 2), "x=1: bad", environ, waits.append)
    assert code == failures.EXIT_BAD_INPUT and waits == []
    assert json.loads(error_file.read_text())["message"]["message"] == "x=1: bad"
    code = failures.report_bad_input(DistEnv(1, 2, 1, 2), "x=1: bad", {}, waits.append)
    assert code == failures.EXIT_BAD_INPUT and waits == [failures.REPORT_GRACE_S]


def test_a_survivor_waits_then_says_one_line(tmp_path: Path) -> None:
    waits: list[float] = []
    error_file = tmp_path / "error.json"
    timeout = RuntimeError(
        "[/x/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation to complete"
    )
    environ = {"TORCHELASTIC_ERROR_FILE": str(error_file)}
    code = failures.report_peer_failure(DistEnv(2, 3, 2, 3), timeout, environ, waits.append)
    assert code == failures.EXIT_PEER_LOST and waits == [failures.REPORT_GRACE_S]
    message = json.loads(error_file.read_text())["message"]["message"]
    assert message.startswith("rank 2 lost contact") and "Timed out waiting 5000ms" in message and "[" not in message


def test_a_problem_passed_on_is_said_by_its_finder(tmp_path: Path) -> None:
    """The rank that found an output.dir problem says it at once; a rank it was passed on to
    waits the grace (so the finder is torchrun's root cause), and both exit with 2."""
    waits: list[float] = []
    error_file = tmp_path / "error.json"
    environ = {"TORCHELASTIC_ERROR_FILE": str(error_file)}
    code = failures.report_run_error(OutputDirError("output.dir=x: in use"), environ, waits.append)
    assert code == failures.EXIT_BAD_INPUT and waits == []
    code = failures.report_run_error(failures.FoundElsewhere("output.dir=x: in use"), environ, waits.append)
    assert code == failures.EXIT_BAD_INPUT and waits == [failures.REPORT_GRACE_S]
    assert json.loads(error_file.read_text())["message"]["message"] == "output.dir=x: in use"


def test_ctrl_c_interrupts_once() -> None:
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(KeyboardInterrupt):
            failures.interrupt_once(signal.SIGINT, None)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # a second Ctrl-C: no second traceback
    finally:
        signal.signal(signal.SIGINT, previous)
    assert failures.report_interrupt(DistEnv(0, 2, 0, 2), {}) == failures.EXIT_INTERRUPTED == 130


def test_peer_failures_are_told_from_bugs() -> None:
    gloo_closed = RuntimeError(
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:41149. "
        "This is typically caused by a remote worker crashing."
    )
    assert failures.is_peer_failure(gloo_closed)
    assert failures.gist(gloo_closed) == "Connection closed by peer [127.0.0.1]:41149"
    assert failures.is_peer_failure(torch.distributed.DistBackendError("NCCL watchdog timeout"))
    assert not failures.is_peer_failure(RuntimeError("shape mismatch"))
    assert not failures.is_peer_failure(ValueError("gloo"))


def test_hydra_errors_become_one_line() -> None:
    conf = REPO / "conf"
    line = failures.command_line_problem(conf, "config", ["generation.top_pp=2"])
    assert line is not None and "\n" not in line and "generation.top_pp" in line
    line = failures.command_line_problem(conf, "config", ["pipeline=fast"])
    assert line is not None and "pipeline/fast" in line and "balanced, uniform" in line
    assert failures.command_line_problem(conf, "config", ["generation.top_p=0.5"]) is None
    assert failures.command_line_problem(conf, "config", ["--cfg", "job"]) is None
    parse = OverrideParseException("prompts=[x", "no viable alternative at input '[x'\nSee https://hydra.cc")
    assert failures.one_line(parse) == "prompts=[x: no viable alternative at input '[x'"
