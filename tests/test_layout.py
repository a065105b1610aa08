"""The package's layout rule, checked on every run: imports point one way along the data flow.

io ← anatomy, io ← model ← segment ← pipeline ← {evaluation ← training, ingest ← workers, cluster} ← cli, with the store and the
reports beside them (store ← report, store ← export), never importing torch or the model; the grader review
(review) sits above the pipeline, the store and the evaluation. The test reads every
module's ``import`` statements (also those inside functions and under TYPE_CHECKING) and fails on
an import against the arrows or on a cycle between modules, so the rule stays true as code grows.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "hrf_batch"
BASE = {"__init__", "errors"}  # the version and the error types: anyone may import them
ALLOWED: dict[str, set[str]] = {
    "__init__": set(),
    "errors": set(),
    "config": set(),
    "io": set(),
    "synthetic": {"io"},
    "model": {"io"},
    "anatomy": {"io", "results"},
    "segment": {"io", "model"},
    "results": {"io"},
    "pipeline": {"config", "io", "anatomy", "model", "segment", "results"},
    "store": {"io", "results"},
    "report": {"io", "results", "store"},
    "evaluation": {"io", "anatomy", "model", "segment", "pipeline", "results"},
    "training": {"io", "model", "evaluation"},  # validation during training uses the evaluation metrics
    "ingest": {"config", "io", "anatomy", "model", "segment", "pipeline", "results", "store"},
    "workers": {"config", "io", "anatomy", "model", "segment", "pipeline", "results", "store", "ingest"},
    "cluster": {"config", "io", "anatomy", "model", "segment", "pipeline", "results", "store", "ingest"},
    "export": {"io", "results", "store"},  # DICOM SEG/OCT and NIfTI: stored masks beside the source pixels
    "review": {"config", "io", "anatomy", "model", "segment", "pipeline", "results", "store", "report", "evaluation"},
    "cli": {"config", "io", "synthetic", "anatomy", "model", "segment", "results", "pipeline", "store", "report", "evaluation",
            "training", "ingest", "workers", "cluster", "export", "review"},
    "__main__": {"cli"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str:
    """The layer a module belongs to: its folder or top-level module under hrf_batch."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, known: set[str]) -> set[str]:
    """The hrf_batch modules one file imports (``from pkg import submodule`` resolves to the submodule)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                     for alias in node.names]
        else:
            continue
        out.update(n for n in names if n == "hrf_batch" or n.startswith("hrf_batch."))
    return out


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imported(path, known) - {name} for name, path in found.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of nodes (first = last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_layer_is_placed() -> None:
    units = {unit_of(m) for m in modules()}
    assert units == set(ALLOWED), f"new or removed layer(s): {sorted(units ^ set(ALLOWED))}; place them in ALLOWED"


def test_imports_point_one_way() -> None:
    wrong = []
    for module, targets in import_graph().items():
        source = unit_of(module)
        for target in targets:
            dest = unit_of(target)
            if dest != source and dest not in ALLOWED[source] | BASE:
                wrong.append(f"{module} imports {target} ({source} → {dest})")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles() -> None:
    graph = import_graph()
    units: dict[str, set[str]] = {}
    for module, targets in graph.items():
        units.setdefault(unit_of(module), set()).update(unit_of(t) for t in targets if unit_of(t) != unit_of(module))
    assert find_cycle(units) is None, f"layers import each other: {' → '.join(find_cycle(units) or [])}"
    assert find_cycle(graph) is None, f"modules import each other: {' → '.join(find_cycle(graph) or [])}"


def test_the_checks_catch_a_wrong_way_import_and_a_cycle(tmp_path: Path) -> None:
    """The checks themselves: a planted back-edge is seen by both."""
    fake = tmp_path / "m.py"
    fake.write_text("from hrf_batch.ingest import ingest_study\n")
    assert imported(fake, set(modules())) == {"hrf_batch.ingest"}
    assert "ingest" not in ALLOWED["model"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("package", ["hrf_batch.store", "hrf_batch.report", "hrf_batch.export"])
def test_store_and_report_never_import_torch(package: str) -> None:
    code = f"import sys, {package}; print(sorted(m for m in ('torch', 'hrf_batch.model', 'sam2') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT, check=True)
    assert done.stdout.strip() == "[]", f"importing {package} loaded {done.stdout.strip()}"


def test_pipeline_does_not_load_evaluation_or_training() -> None:
    """Importing the pipeline must not pull in labels, study scanning or scikit-learn (evaluation code)."""
    code = ("import sys, hrf_batch.pipeline; "
            "print(sorted(m for m in sys.modules if m.startswith(('hrf_batch.evaluation', 'hrf_batch.training', "
            "'hrf_batch.io.labels', 'sklearn'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT, check=True)
    assert done.stdout.strip() == "[]", done.stdout
