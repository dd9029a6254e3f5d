"""The shape of the project as tests: dependency direction, no import cycles, a light ``strategies``.

The import graph is read from the source (``ast``), not from ``sys.modules``, so an import inside a
function counts as much as one at the top of a module: a cycle hidden in a function body still
couples the two modules. Relative imports are resolved against the importing module's package.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fedpeft", "strategies", "simulations")
DATA_LOADING = ("fedpeft.task", "fedpeft.data", "datasets", "flwr_datasets")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path, module: str) -> set[str]:
    """Every module ``path`` imports, anywhere in its body, as absolute dotted names."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names.add(source)
            # ``from pkg import mod`` imports the submodule pkg.mod when there is one
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` blocks (type hints, never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def project_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (module-level and function-level)."""
    files = {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        graph[module] = {name for name in imported_names(path, module) if name in files and name != module}
    return graph


def external_imports(module: str) -> set[str]:
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    return imported_names(files[module], module)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None; iterative DFS, deterministic order."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    for start in sorted(graph):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                state[node] = 2
            elif state.get(child) == 1:
                return path[path.index(child) :] + [child]
            elif not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph[child]))))
    return None


def test_the_cycle_finder_reports_a_hand_made_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_relative_imports_resolve_to_absolute_module_names(tmp_path):
    pkg = tmp_path / "pkg" / "sub"
    pkg.mkdir(parents=True)
    source = pkg / "mod.py"
    source.write_text(
        "from . import sibling\nfrom ..top import x\ndef f():\n    import torch\n"
        "if TYPE_CHECKING:\n    import hints_only\n"
    )
    assert imported_names(source, "pkg.sub.mod") == {"pkg.sub", "pkg.sub.sibling", "pkg.top", "pkg.top.x", "torch"}


def test_the_project_has_no_import_cycles_counting_imports_inside_functions():
    graph = project_graph()
    assert len(graph) > 50 and graph["simulations.run"]  # the graph was really read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_fedpeft_imports_neither_strategies_nor_simulations():
    graph = project_graph()
    bad = sorted(
        f"{m} -> {d}"
        for m, deps in graph.items()
        if m.startswith("fedpeft")
        for d in deps
        if not d.startswith("fedpeft")
    )
    assert bad == []


def test_strategies_never_import_simulations():
    graph = project_graph()
    bad = sorted(
        f"{m} -> {d}"
        for m, deps in graph.items()
        if m.startswith("strategies")
        for d in deps
        if d.startswith("simulations")
    )
    assert bad == []


def test_no_strategy_imports_data_loading():
    graph = project_graph()
    bad = []
    for module in sorted(m for m in graph if m.startswith("strategies")):
        for name in sorted(external_imports(module)):
            if any(name == d or name.startswith(d + ".") for d in DATA_LOADING):
                bad.append(f"{module} -> {name}")
    assert bad == []


def test_importing_every_strategy_module_leaves_torch_out_of_sys_modules():
    modules = sorted(m for m in project_graph() if m.startswith("strategies"))
    code = (
        f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_importing_the_client_app_leaves_the_deployment_tooling_unloaded():
    code = "import sys, simulations.client_app; print(sorted(m for m in sys.modules if m.startswith('simulations.deploy')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def entries(lines: list[str]) -> list[str]:
    """Each line joined with the indented continuation lines below it (a file-map entry)."""
    joined = []
    for i, line in enumerate(lines):
        rest = []
        for follow in lines[i + 1 :]:
            if not follow.startswith(" "):
                break
            rest.append(follow.strip())
        joined.append(" ".join([line, *rest]))
    return joined


def unlisted_modules(readme: str, root: Path = ROOT) -> list[str]:
    """Project modules README's file map does not name.

    A top-level module must appear by path (``fedpeft/train.py``); a module in a sub-folder
    (``simulations/bench/scale.py``) by path, or by its file name on its folder's line
    (``simulations/bench/   benchmarks: ... scale.py (10,000 clients) ...``). ``__init__.py`` files are exempt.
    """
    files_section = readme.split("## Files", 1)[-1]
    lines = files_section.splitlines()
    missing = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if path.name == "__init__.py" or rel in files_section:
                continue
            folder = rel.rsplit("/", 1)[0] + "/"
            folder_lines = [
                entry for line, entry in zip(lines, entries(lines), strict=True) if line.startswith(folder + " ")
            ]
            if folder.count("/") > 1 and any(re.search(rf"\b{re.escape(path.name)}\b", line) for line in folder_lines):
                continue
            missing.append(rel)
    return missing


def test_the_file_map_check_flags_an_unlisted_module(tmp_path):
    (tmp_path / "fedpeft" / "sub").mkdir(parents=True)
    for name in ("fedpeft/a.py", "fedpeft/b.py", "fedpeft/sub/c.py", "fedpeft/sub/d.py", "fedpeft/__init__.py"):
        (tmp_path / name).write_text("")
    readme = "## Files\nfedpeft/a.py   one\nfedpeft/sub/   things: xd.py,\n              c.py\n"
    assert unlisted_modules(readme, tmp_path) == ["fedpeft/b.py", "fedpeft/sub/d.py"]


def test_the_readme_file_map_lists_every_module():
    missing = unlisted_modules((ROOT / "README.md").read_text())
    assert not missing, f"README.md's '## Files' map does not list: {missing} (add one line each)"
