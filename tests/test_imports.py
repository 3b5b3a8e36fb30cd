"""The import graph: no circles (imports inside functions included), imports point one way
(``config`` <- ``data``/``models``/``method`` <- ``step`` <- ``train`` <- ``ray_glue`` <- ``tune.py``,
docs/architecture.md), Ray only in ``ray_glue``, and the core imports without Ray."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> list[Path]:
    return [*(ROOT / "t2sda").rglob("*.py"), *(ROOT / "tune_spaces").rglob("*.py"), ROOT / "tune.py"]


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in _sources()}
    graph = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                # "from t2sda.data import real": the submodule when there is one
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files
                            else node.module for a in node.names}
        # A package's __init__ importing its own submodules (a registry, e.g. t2sda.models)
        # is not counted: the submodules load after what they need from it.
        graph[name] = {t for t in targets if t in files and t != name
                       and not (path.name == "__init__.py" and t.startswith(name + "."))}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_no_import_circles():
    graph = _graph()
    assert graph["t2sda.data.loaders"]  # the graph is read (not trivially empty)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]  # the check itself works


def test_library_never_imports_the_cli():
    users = {m for m, deps in _graph().items() if "t2sda.__main__" in deps}
    assert users == set()


# Layers, lowest first. A module may import its own group and any lower layer, nothing else:
# not a higher layer, and not another group of its own layer (data, models and method stand
# side by side). "pkg." names a package and all it holds; other names are single modules. A new
# module must be placed here; docs/architecture.md draws the same map.
LAYERS = [
    {"config": ["t2sda.config", "t2sda.config_parse"],
     "helpers": ["t2sda", "t2sda.dist", "t2sda.schedules", "t2sda.checkpoint", "t2sda.tb",
                 "t2sda.validators", "t2sda.diagnostics", "t2sda.stats",  # stats: seed statistics
                 "t2sda.remote"]},  # remote: runs in buckets
    {"data": ["t2sda.data."], "models": ["t2sda.models."], "method": ["t2sda.method."],
     "presets": ["t2sda.presets", "t2sda.settings"], "perf": ["t2sda.perf"], "scoring": ["t2sda.scoring"],
     "model_export": ["t2sda.model_export"], "spaces": ["tune_spaces."]},
    {"step": ["t2sda.step", "t2sda.state", "t2sda.monitor"],
     "inference": ["t2sda.inference", "t2sda.predictions"]},
    {"train": ["t2sda.train"], "cli": ["t2sda.cli."]},
    {"ray_glue": ["t2sda.ray_glue."]},
    {"entry": ["t2sda.__main__", "tune"]},
]
# config checks names against two registries below it, importing them inside the check (the
# registries import nothing that imports config at module level).
ALLOWED_UPWARD = {("t2sda.config", "t2sda.data.folders"), ("t2sda.config", "t2sda.models")}


def _place(module: str, layers=LAYERS) -> tuple[int, str] | None:
    """(layer, group) of ``module``: its own name, or the package that holds it."""
    for level, groups in enumerate(layers):
        for group, names in groups.items():
            if any(module == name.rstrip(".") or (name.endswith(".") and module.startswith(name))
                   for name in names):
                return level, group
    return None


def _wrong_way(graph: dict[str, set[str]], layers=LAYERS, allowed=frozenset()) -> list[str]:
    wrong = []
    for module, targets in sorted(graph.items()):
        (level, group) = _place(module, layers)
        for target in sorted(targets):
            (t_level, t_group) = _place(target, layers)
            if t_group != group and t_level >= level and (module, target) not in allowed:
                wrong.append(f"{module} ({group}) imports {target} ({t_group})")
    return wrong


def test_every_module_has_a_layer():
    assert [m for m in _graph() if _place(m) is None] == []
    assert _place("t2sda.new_module") is None and _place("t2sda.data.new") == (1, "data")


def test_imports_point_one_way():
    graph = _graph()
    assert _wrong_way(graph, allowed=ALLOWED_UPWARD) == []
    assert all(target in graph[module] for module, target in ALLOWED_UPWARD)  # none stale


def test_layer_check_catches_upward_and_sideways_imports():
    layers = [{"low": ["p.low"]}, {"a": ["p.a."], "b": ["p.b"]}, {"top": ["p.top"]}]
    graph = {"p.low": {"p.a.x"}, "p.a.x": {"p.a.y", "p.b", "p.low"}, "p.a.y": set(), "p.b": set(),
             "p.top": {"p.a.x", "p.low"}}
    assert _wrong_way(graph, layers) == ["p.a.x (a) imports p.b (b)", "p.low (low) imports p.a.x (a)"]
    assert _wrong_way(graph, layers, allowed={("p.low", "p.a.x"), ("p.a.x", "p.b")}) == []


def test_only_ray_glue_imports_ray():
    offenders = []
    for path in _sources():
        if "ray_glue" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "ray" or n.startswith("ray.") for n in names):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_the_core_and_its_commands_import_without_ray():
    code = ("import sys, t2sda.train, t2sda.cli.evaluate, t2sda.cli.predict, t2sda.cli.export, "
            "t2sda.__main__; print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_no_source_file_over_400_lines():
    """docs/architecture.md's rule: split a module by what its pieces do before it grows past 400."""
    root = Path(__file__).resolve().parents[1]
    files = [*(root / "t2sda").rglob("*.py"), *(root / "tune_spaces").rglob("*.py"), root / "tune.py"]
    long = {str(f.relative_to(root)): n for f in files
            if (n := len(f.read_text().splitlines())) > 400}
    assert not long, f"over 400 lines: {long}"
