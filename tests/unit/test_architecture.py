"""The package's shape holds: no import cycles between modules or between packages, leaf helpers import nothing of ours, and the parts
stay apart (the stages never import test support; a training worker does not load DSPy)."""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "bootfinetune"


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (lazy imports inside functions included)."""
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t not in (name, "bootfinetune")}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def package_of(module: str) -> str:
    """The floor a module stands on: its sub-package (`bootfinetune.stages`), or itself for a top-level module."""
    return ".".join(module.split(".")[:2])


def package_graph() -> dict[str, set[str]]:
    """Package -> the packages its modules import, imports inside functions included; `bootfinetune` (the
    package's `__init__`, which names the public API) counts as a package of its own."""
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = graph.setdefault(package_of(name), set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            edges |= {package_of(t) for t in targets if t in modules and package_of(t) != package_of(name)}
    return graph


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_no_import_cycles_between_packages():
    assert cycles(package_graph()) == []


def test_a_package_loop_through_an_import_inside_a_function_is_found(tmp_path, monkeypatch):
    for path, text in {"__init__.py": "", "a/__init__.py": "", "a/x.py": "import bootfinetune.b.y\n",
                       "b/__init__.py": "", "b/y.py": "def f():\n    from bootfinetune.a.x import g\n"}.items():
        (tmp_path / "bootfinetune" / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "bootfinetune" / path).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "PKG", tmp_path / "bootfinetune")
    assert cycles(package_graph()) == [["bootfinetune.a", "bootfinetune.b"]]


def test_a_cycle_is_found_when_there_is_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_leaf_helpers_import_nothing_of_ours():
    graph = import_graph()
    leaves = [m for m in graph if m.startswith("bootfinetune.common.") or m in
              ("bootfinetune.errors", "bootfinetune.run.jsonio")]
    assert len(leaves) >= 6
    assert {m: sorted(graph[m]) for m in leaves if graph[m]} == {}


def test_the_stages_training_and_serving_never_import_test_support():
    graph = import_graph()
    parts = ("bootfinetune.stages", "bootfinetune.training", "bootfinetune.serving", "bootfinetune.run",
             "bootfinetune.compiler", "bootfinetune.pipeline")
    offenders = {m: sorted(t for t in graph[m] if t.startswith("bootfinetune.testing"))
                 for m in graph if m.startswith(parts)}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_modules_stay_under_500_lines():
    sizes = {module_name(p): len(p.read_text().splitlines()) for p in PKG.rglob("*.py")}
    assert {m: n for m, n in sizes.items() if n >= 500} == {}


def test_a_training_worker_does_not_load_dspy():
    code = ("import sys, bootfinetune.training.train_loop, bootfinetune.stages.finetune; "
            "print(sorted(m for m in sys.modules if m == 'dspy' or m.startswith('dspy.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_config_json_is_written_only_by_the_run_directory():
    """Every config.json write goes through `RunDir.write_description`, the door that redacts credentials."""
    import re

    writes = re.compile(r"(write_json|atomic_write|write_text|write_bytes|open)\([^)\n]*(config_json|\"config\.json\")")
    offenders = [module_name(p) for p in PKG.rglob("*.py") if writes.search(p.read_text())
                 and module_name(p) != "bootfinetune.run.rundir"]
    assert offenders == []


RUN_FILE_WRITERS = {"bootfinetune.run.rundir", "bootfinetune.run.storage", "bootfinetune.run.trace_store",
                    "bootfinetune.run.writer", "bootfinetune.training.checkpoints", "bootfinetune.testing.tiny_models"}
"""The modules that write JSON files: the run directory (every run file, through its record), its mirror's
sync state, the trace store, the writer lock, a checkpoint's trainer_state.json, and a tiny model's stamp."""


def test_run_files_are_read_and_written_only_by_the_run_directory():
    """Outside the modules above, no module writes a JSON file or reads one whole (`read_json`): the stages and
    entrypoints go through `RunDir`'s methods and records. Data files (`read_jsonl`) are read by path."""
    door = {"read_json", "write_json", "write_jsonl", "iter_jsonl", "atomic_write"}
    offenders = {}
    for path in PKG.rglob("*.py"):
        name = module_name(path)
        if name in RUN_FILE_WRITERS or name == "bootfinetune.run.jsonio":
            continue
        used = {a.name for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.ImportFrom) and node.module == "bootfinetune.run.jsonio" for a in node.names}
        if used & door:
            offenders[name] = sorted(used & door)
    assert offenders == {}
