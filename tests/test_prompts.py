"""Prompts files: split into lines at "\n" only, CRLF endings, .txt and .jsonl."""

from __future__ import annotations

from pathlib import Path

import pytest

from ppinfer.errors import PromptError
from ppinfer.pipeline.job import read_prompts_file

# Characters str.splitlines() breaks at, which a single prompt may legitimately hold.
IN_LINE = ["\u2028", "\u2029", "\x0c", "\x0b", "\x1c", "\x85", "\r"]


def _write(path: Path, text: str) -> str:
    path.write_bytes(text.encode("utf-8"))
    return str(path)


@pytest.mark.parametrize("char", IN_LINE)
def test_txt_line_holding_a_unicode_break_is_one_prompt(tmp_path: Path, char: str) -> None:
    path = _write(tmp_path / "p.txt", f"first{char}half\nsecond\n")
    assert read_prompts_file(path) == [f"first{char}half", "second"]


def test_txt_crlf_and_blank_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.txt", "one\r\n\r\n  \r\ntwo\r\nthree")
    assert read_prompts_file(path) == ["one", "two", "three"]


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\x85"])
def test_jsonl_raw_unicode_break_inside_a_string_is_valid(tmp_path: Path, char: str) -> None:
    # JSON allows these unescaped inside strings; json.dumps(ensure_ascii=False) writes them so.
    path = _write(tmp_path / "p.jsonl", f'"a{char}b"\r\n{{"prompt": "c{char}d", "seed": 1}}\n')
    assert read_prompts_file(path) == [f"a{char}b", f"c{char}d"]


def test_jsonl_error_counts_lines_by_newline_only(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.jsonl", '"x\u2028y"\n"fine"\n{"prompt": broken}\n')
    with pytest.raises(PromptError, match="line 3 is not valid JSON"):
        read_prompts_file(path)
