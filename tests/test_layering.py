"""The layering of docs/DESIGN.md, checked on the source: every package imports only what the
page's table allows (the table is read from the page itself), no module imports another in a
cycle, the model never imports torch.distributed, the pipeline uses the families only through
their package API, and the kernels know nothing of layers, families or ranks."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "ppinfer"
DESIGN = REPO / "docs" / "DESIGN.md"


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _imports(path: Path, with_names: bool = False) -> set[str]:
    """Every module `path` imports from; `with_names` adds `module.name` for each `from module
    import name` (which may itself be a module, as in `from torch import distributed`)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if with_names:
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _package(module: str) -> str:
    """`ppinfer.pipeline.rank` -> `pipeline`; `ppinfer.errors` -> `errors`."""
    return module.split(".")[1] if module.count(".") else ""


def allowed_imports() -> dict[str, set[str]]:
    """The table of docs/DESIGN.md: package -> the packages it may import."""
    text = DESIGN.read_text(encoding="utf-8")
    table = text[text.index("<!-- allowed-imports"):].split("\n\n", 1)[0]
    allowed = {}
    for row in table.splitlines()[3:]:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        allowed[cells[0].strip("`")] = {name.strip() for name in cells[2].split(",") if name.strip()}
    return allowed


def test_every_package_imports_only_what_the_design_allows() -> None:
    allowed = allowed_imports()
    modules = _modules()
    seen: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        package = _package(name)
        if not package:
            continue  # ppinfer/__init__.py: the package's public face (load_tokenizer)
        assert package in allowed, f"{package} is missing from the table of docs/DESIGN.md"
        for imported in _imports(path):
            if imported.startswith("ppinfer.") and _package(imported) != package:
                seen[package].add(_package(imported))
    for package, imported in seen.items():
        extra = imported - allowed[package]
        assert not extra, f"{package} imports {sorted(extra)}, which docs/DESIGN.md does not allow"
    assert set(allowed) - {"errors"} <= {_package(m) for m in modules}, "the table names a package that does not exist"


def test_no_module_imports_another_in_a_cycle() -> None:
    modules = _modules()
    graph = {
        name: {m for m in _imports(path, with_names=True) if m in modules and m != name}
        for name, path in modules.items()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for nxt in sorted(graph[name]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt):], nxt]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[name] = 2

    for name in modules:
        if name not in state:
            visit(name, [name])


def test_the_table_is_read_and_the_checker_sees_imports() -> None:
    """Guards against a vacuous pass: the table has every package, and the pipeline does
    import the model and torch.distributed."""
    allowed = allowed_imports()
    assert {"gguf", "model", "pipeline", "serving"} <= set(allowed)
    assert "model" in allowed["pipeline"] and "pipeline" not in allowed["model"]
    imported = set().union(*(_imports(p) for p in (PACKAGE / "pipeline").glob("*.py")))
    assert "torch.distributed" in imported and "ppinfer.model" in imported


def test_model_package_never_imports_torch_distributed() -> None:
    paths = sorted((PACKAGE / "model").glob("*.py"))
    assert paths, "no model modules found"
    for path in paths:
        imported = _imports(path, with_names=True)
        assert not any(m == "torch.distributed" or m.startswith("torch.distributed.") for m in imported), path.name


def test_pipeline_uses_families_only_through_the_package() -> None:
    for path in sorted((PACKAGE / "pipeline").glob("*.py")):
        internals = {m for m in _imports(path) if m.startswith("ppinfer.families.")}
        assert not internals, f"{path.name} reaches into {sorted(internals)}"


def test_kernels_know_no_layers_families_or_ranks() -> None:
    above = ("ppinfer.model", "ppinfer.families", "ppinfer.pipeline", "torch.distributed")
    paths = sorted((PACKAGE / "kernels").glob("*.py"))
    assert any(p.name == "select.py" for p in paths)
    for path in paths:
        bad = {m for m in _imports(path, with_names=True) if any(m == a or m.startswith(a + ".") for a in above)}
        assert not bad, f"kernels/{path.name} imports {sorted(bad)}"


def test_comments_name_no_issue_numbers() -> None:
    """History lives in git; the code says what is, not which issue asked for it."""
    pattern = re.compile(r"\bissue \d+|\(issue", re.IGNORECASE)
    hits = [
        f"{p.relative_to(REPO)}" for p in sorted(PACKAGE.rglob("*.py")) if pattern.search(p.read_text(encoding="utf-8"))
    ]
    assert not hits, hits


def test_entry_points_leave_torch_compiler_stack_unimported() -> None:
    """Every rank imports the rank body and the server: neither may pull in torch's compiler
    stack (sympy, functorch; about 115 MB of resident memory per rank), which a lazily used
    dependency can drag in at import time."""
    code = (
        "import sys, ppinfer.pipeline.rank, ppinfer.serving.launch; "
        "print(sorted({'sympy', 'functorch'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", out.stdout
