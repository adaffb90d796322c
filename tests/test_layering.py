"""The layering rules of DESIGN.md, checked on the source: the model never imports
torch.distributed, the pipeline uses the families only through their package API, and the
kernels know nothing of layers, families or ranks."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ppinfer"


def _imports(folder: str, with_names: bool = False) -> dict[str, set[str]]:
    """Module file -> every module it imports from; `with_names` adds `module.name` for each
    `from module import name` (which may itself be a module, as in `from torch import distributed`)."""
    found: dict[str, set[str]] = {}
    for path in sorted((PACKAGE / folder).glob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
                if with_names:
                    names.update(f"{node.module}.{alias.name}" for alias in node.names)
        found[path.name] = names
    return found


def test_model_package_never_imports_torch_distributed() -> None:
    modules = _imports("model", with_names=True)
    assert modules, "no model modules found"
    for name, imported in modules.items():
        assert not any(m == "torch.distributed" or m.startswith("torch.distributed.") for m in imported), name


def test_pipeline_uses_families_only_through_the_package() -> None:
    for name, imported in _imports("pipeline").items():
        internals = {m for m in imported if m.startswith("ppinfer.families.")}
        assert not internals, f"{name} reaches into {sorted(internals)}"


def test_kernels_know_no_layers_families_or_ranks() -> None:
    modules = _imports("kernels", with_names=True)
    assert "select.py" in modules
    above = ("ppinfer.model", "ppinfer.families", "ppinfer.pipeline", "torch.distributed")
    for name, imported in modules.items():
        bad = {m for m in imported if any(m == a or m.startswith(a + ".") for a in above)}
        assert not bad, f"kernels/{name} imports {sorted(bad)}"


def test_pipeline_knows_nothing_of_the_server() -> None:
    """The HTTP layer sits on top of the pipeline, never the other way round."""
    for name, imported in _imports("pipeline").items():
        serving = {m for m in imported if m == "ppinfer.serving" or m.startswith("ppinfer.serving.")}
        assert not serving, f"pipeline/{name} imports {sorted(serving)}"


def test_the_checker_sees_imports() -> None:
    """Guard against a vacuous pass: the pipeline does import torch.distributed."""
    assert any("torch.distributed" in imported for imported in _imports("pipeline").values())
