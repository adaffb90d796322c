"""Prompts files: split into lines at "\n" only, CRLF endings, a BOM, .txt and .jsonl, and the
per-request generation settings of a .jsonl line as a prepared job carries them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pipeline_driver import compose_config
from pipeline_models import PIPELINE_SPECS, write_pipeline_model

from ppinfer.errors import PromptError
from ppinfer.pipeline.job import DistEnv, Job, prepare, read_prompts_file
from ppinfer.sampling.params import GenerationParams
from ppinfer.sampling.sampler import stream_seed

# Characters str.splitlines() breaks at, which a single prompt may legitimately hold.
IN_LINE = ["\u2028", "\u2029", "\x0c", "\x0b", "\x1c", "\x85", "\r"]


def _write(path: Path, text: str) -> str:
    path.write_bytes(text.encode("utf-8"))
    return str(path)


def _texts(path: str) -> list[str]:
    return [text for text, _ in read_prompts_file(path)]


@pytest.mark.parametrize("char", IN_LINE)
def test_txt_line_holding_a_unicode_break_is_one_prompt(tmp_path: Path, char: str) -> None:
    path = _write(tmp_path / "p.txt", f"first{char}half\nsecond\n")
    assert read_prompts_file(path) == [(f"first{char}half", {}), ("second", {})]


def test_txt_crlf_and_blank_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.txt", "one\r\n\r\n  \r\ntwo\r\nthree")
    assert _texts(path) == ["one", "two", "three"]


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\x85"])
def test_jsonl_raw_unicode_break_inside_a_string_is_valid(tmp_path: Path, char: str) -> None:
    # JSON allows these unescaped inside strings; json.dumps(ensure_ascii=False) writes them so.
    path = _write(tmp_path / "p.jsonl", f'"a{char}b"\r\n{{"prompt": "c{char}d", "seed": 1}}\n')
    assert read_prompts_file(path) == [(f"a{char}b", {}), (f"c{char}d", {"seed": 1})]


def test_jsonl_error_counts_lines_by_newline_only(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.jsonl", '"x\u2028y"\n"fine"\n{"prompt": broken}\n')
    with pytest.raises(PromptError, match="line 3 is not valid JSON"):
        read_prompts_file(path)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path: Path, suffix: str) -> None:
    lines = "first\nsecond\n" if suffix == ".txt" else '{"prompt": "first"}\n"second"\n'
    path = _write(tmp_path / f"p{suffix}", "\ufeff" + lines)
    assert _texts(path) == ["first", "second"]


# ---- per-request settings of a .jsonl line, in a prepared job -------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pipeline_model(tmp_path_factory.mktemp("prompts") / "llama.gguf", PIPELINE_SPECS["llama"])


def _job(model: Path, tmp_path: Path, lines: list[object], *overrides: str) -> Job:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    cfg = compose_config((f"model.path={model}", f"output.dir={tmp_path / 'out'}", "runtime.device=cpu",
                          f"prompts_file={prompts}", "generation.max_new_tokens=4", "generation.seed=2", *overrides))
    return prepare(cfg, DistEnv(0, 1, 0, 1), cuda_available=False, family_given=False)


def test_jsonl_settings_override_the_config_per_prompt(tiny_model: Path, tmp_path: Path) -> None:
    """Line 0 changes its budget, temperature and stop (a lone string is one stop string),
    line 1 is the config's, line 2 has its own seed: its random stream is the one of (7, index
    0), as a server request with that seed, wherever it sits in the file; the others' come
    from (generation.seed, their index). Rows are sized for the longest prompt plus the
    largest budget less one."""
    job = _job(tiny_model, tmp_path, [
        {"prompt": "a b", "max_new_tokens": 9, "temperature": 0.5, "stop": "x"},
        "c",
        {"prompt": "d", "seed": 7, "ignore_eos": True, "top_k": 3},
    ])
    defaults = GenerationParams(max_new_tokens=4, seed=2)
    assert job.texts == ["a b", "c", "d"]
    assert job.params == [
        GenerationParams(max_new_tokens=9, temperature=0.5, stop=["x"], seed=2),
        defaults,
        GenerationParams(max_new_tokens=4, seed=7, ignore_eos=True, top_k=3),
    ]
    assert job.stream_seeds == [stream_seed(2, 0), stream_seed(2, 1), stream_seed(7, 0)]
    assert job.capacity == max(len(p) for p in job.prompts) + 9 - 1


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"temperature": -0.5}, "prompt 1: temperature=-0.5: must be a finite number >= 0"),
        ({"temp": 1}, "prompt 1: temp=1: unknown generation setting"),
        ({"max_new_tokens": 2.5}, "prompt 1: max_new_tokens=2.5: must be an integer"),
        ({"max_new_tokens": 0}, "prompt 1: max_new_tokens=0: must be an integer >= 1"),
        ({"ignore_eos": 1}, "prompt 1: ignore_eos=1: must be true or false"),
        ({"stop": ["ok", ""]}, "prompt 1: stop\\[1\\]='': a stop string needs at least one character"),
        ({"seed": -1}, "prompt 1: seed=-1: must be an integer in"),
    ],
)
def test_bad_jsonl_setting_names_the_prompt_key_and_value(
    tiny_model: Path, tmp_path: Path, setting: dict[str, object], message: str
) -> None:
    with pytest.raises(PromptError, match=f"prompts_file=.*p.jsonl: {message}"):
        _job(tiny_model, tmp_path, ["fine", {"prompt": "bad", **setting}])


@pytest.mark.parametrize(
    ("setting", "key"),
    [({}, "generation.max_new_tokens=100"), ({"max_new_tokens": 200}, "max_new_tokens=200")],
)
def test_a_budget_beyond_the_context_names_where_it_was_set(
    tiny_model: Path, tmp_path: Path, setting: dict[str, object], key: str
) -> None:
    """The tiny model's context is 128 tokens: a budget of 100 (the config's) or 200 (the
    line's) with a prompt of 40 characters does not fit; the message names the key that set
    it."""
    with pytest.raises(PromptError, match=rf"prompt 1 has \d+ tokens; with {key} it exceeds the context of 128"):
        _job(tiny_model, tmp_path, ["fine", {"prompt": "abc " * 10, **setting}], "generation.max_new_tokens=100")
