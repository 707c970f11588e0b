"""The repository's shape, read with ast (nothing of the project is imported): layers point down,
no import cycle between modules, no .py file over 450 lines, cli.py at most 350 lines (issue 12).

Every import counts (an edge to the module named, not to the packages above it: their __init__.py
files import nothing): module-level, inside functions, under ``if TYPE_CHECKING:``. A function-level
import still makes the importer depend on the imported module (it runs whenever the function does),
and moving an import into a function is the usual way a real cycle is hidden, so it is not an
exemption. A failure lists every offending file, edge or cycle with its line.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
# lower never imports higher; everything at TOP is a user of the library
LAYERS = {"core": 0, "teachers": 1, "data": 2, "store": 3, "extract": 4, "train": 5, "eval": 6}
TOP = {"demo", "samples", "bench", "cli"}
NOT_CODE = {"tests", "docs"}                          # folders that hold no importable project modules
SKIP_DIRS = {"build", "dist", "runs", "demo_out", "__pycache__", "node_modules"}
MAX_LINES, MAX_CLI_LINES = 450, 350


def repo_py_files() -> list[Path]:
    """Every .py file of the repository: hidden folders (.venv, .git) and build outputs left out."""
    out = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not (d.startswith(".") or d in SKIP_DIRS or d.endswith(".egg-info"))]
        out += [Path(folder) / f for f in files if f.endswith(".py")]
    return sorted(out)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    """Dotted name -> file of every importable project module (top-level .py files and packages)."""
    return {module_name(p): p for p in repo_py_files() if p.relative_to(ROOT).parts[0] not in NOT_CODE}


MODULES = project_modules()


def imports_of(name: str, path: Path, modules: dict[str, Path], tops: set[str]) -> list[tuple[str, int]]:
    """(imported project module, line) for every import in ``path``, resolved to the longest
    project module prefix (``from a import b`` gives a.b when a/b is a module, else a)."""
    is_package = path.name == "__init__.py"
    package = name.split(".") if is_package else name.split(".")[:-1]

    def resolve(dotted: str) -> str | None:
        if dotted.split(".")[0] not in tops:
            return None
        parts = dotted.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in modules:
                return ".".join(parts[:n])
        return parts[0]                               # a namespace package without __init__.py

    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(resolve(alias.name), node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            for alias in node.names:
                child = f"{base_name}.{alias.name}" if base_name else alias.name
                found.append((resolve(child) if child in modules else resolve(base_name), node.lineno))
    return [(target, line) for target, line in found if target is not None and target != name]


def import_graph() -> dict[str, list[tuple[str, int]]]:
    modules = MODULES
    tops = {n.split(".")[0] for n in modules}
    return {name: imports_of(name, path, modules, tops) for name, path in modules.items()}


def where(module: str) -> str:
    path = MODULES.get(module)
    return str(path.relative_to(ROOT)) if path else module


def layer_of(module: str) -> int | None:
    top = module.split(".")[0]
    return LAYERS.get(top, len(LAYERS) if top in TOP else None)


def test_library_layers_import_only_lower_layers():
    """core < store < extract < train < eval; nothing in them imports demo/, samples/, bench/ or cli."""
    graph = import_graph()
    bad = sorted(f"{where(src)}:{line} imports {dst} ({dst.split('.')[0]} is above {src.split('.')[0]})"
                 for src, edges in graph.items() if src.split(".")[0] in LAYERS
                 for dst, line in edges if layer_of(dst) is not None and layer_of(dst) > layer_of(src))
    unranked = sorted({src.split(".")[0] for src in graph} - LAYERS.keys() - TOP)
    assert not unranked, f"top-level module(s) with no layer in tests/test_layout.py LAYERS/TOP: {unranked}"
    assert not bad, f"{len(bad)} upward import(s):\n" + "\n".join(bad)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of more than one module, each sorted; recursion is fine at this size."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def one_cycle(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first inside the component)."""
    start, inside = component[0], set(component)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(graph[path[-1]] & inside):
            if w == start:
                return path + [start]
            if w not in seen:
                seen.add(w)
                paths.append(path + [w])
    raise AssertionError(f"no cycle in component {component}")


def test_cycle_finder_reports_a_cycle_and_ignores_a_chain():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert one_cycle(["a", "b", "c"], graph) == ["a", "b", "c", "a"]
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_imports_resolve_relative_from_and_function_level_forms(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    for name in ("pkg/__init__.py", "pkg/a.py", "pkg/sub/__init__.py", "pkg/sub/b.py"):
        (tmp_path / name).write_text("")
    (tmp_path / "pkg" / "sub" / "c.py").write_text(
        "import os\nfrom . import b\nfrom ..a import x\nfrom pkg import sub\ndef f():\n    import pkg.a\n")
    modules = {"pkg": 0, "pkg.a": 0, "pkg.sub": 0, "pkg.sub.b": 0, "pkg.sub.c": 0}
    got = imports_of("pkg.sub.c", tmp_path / "pkg/sub/c.py", modules, {"pkg"})
    assert got == [("pkg.sub.b", 2), ("pkg.a", 3), ("pkg.sub", 4), ("pkg.a", 6)]


def test_no_import_cycle_between_project_modules():
    graph = import_graph()
    targets = {src: {dst for dst, _ in edges} for src, edges in graph.items()}
    lines = {(src, dst): line for src, edges in graph.items() for dst, line in reversed(edges)}
    report = []
    for component in strongly_connected(targets):
        cycle = one_cycle(component, targets)
        steps = ", ".join(f"{where(a)}:{lines[a, b]} -> {b}" for a, b in zip(cycle, cycle[1:]))
        report.append(f"{' <-> '.join(component)}: {steps}")
    assert not report, f"{len(report)} import cycle(s):\n" + "\n".join(report)


def line_count(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def test_no_python_file_is_over_450_lines():
    long = sorted(f"{p.relative_to(ROOT)}: {n} lines" for p in repo_py_files() if (n := line_count(p)) > MAX_LINES)
    assert not long, f"{len(long)} file(s) over {MAX_LINES} lines:\n" + "\n".join(long)


def test_cli_declares_commands_in_at_most_350_lines():
    n = line_count(ROOT / "cli.py")
    assert n <= MAX_CLI_LINES, f"cli.py: {n} lines (at most {MAX_CLI_LINES})"


# Teacher facts are written once: in the descriptors' module and, keyed by name, their converters
# (an added teacher is one descriptor plus its converter). Elsewhere ViT-B's width, the grid's
# patch count and side, and a teacher's name are read from teachers/descriptors.py. A line may opt out
# with the marker when its number only happens to be one of these (a table's column width).
TEACHER_FACT_MODULES = {"teachers/descriptors.py", "teachers/checkpoints.py"}
TEACHER_NUMBERS = {768, 196, 14}
NOT_A_TEACHER_FACT = "# not a teacher fact"


def descriptor_names() -> set[str]:
    """The names of teachers/descriptors.py's ``TeacherDescriptor("name", ...)`` entries, read with ast."""
    tree = ast.parse((ROOT / "teachers" / "descriptors.py").read_text())
    return {node.args[0].value for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "TeacherDescriptor"
            and node.args and isinstance(node.args[0], ast.Constant)}


def teacher_facts(path: Path, names: set[str]) -> list[tuple[int, object]]:
    """(line, value) of every int constant in TEACHER_NUMBERS and string constant equal to a
    teacher's name in ``path``, less lines carrying the marker."""
    text = path.read_text()
    lines = text.splitlines()
    found = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.Constant):
            continue
        value = node.value
        if (type(value) is int and value in TEACHER_NUMBERS) or (isinstance(value, str) and value in names):
            if NOT_A_TEACHER_FACT not in lines[node.lineno - 1]:
                found.append((node.lineno, value))
    return sorted(found, key=lambda lv: (lv[0], str(lv[1])))


def test_the_teacher_fact_finder_flags_the_numbers_and_names_but_not_a_marked_line(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('W = 768\nT = ("mae", 196)\nK = 14  # not a teacher fact\nS = "a mae in a sentence"\n'
                      'F = 768.0\n')
    assert teacher_facts(module, {"mae"}) == [(1, 768), (2, 196), (2, "mae")]


def test_teacher_facts_are_written_only_in_the_descriptors_and_their_converters():
    names = descriptor_names()
    assert {"mae", "mocov3", "ibot", "dinov2_b14", "dinov2_l14"} <= names
    bad = [f"{rel}:{line}: {value!r}" for path in repo_py_files()
           if (rel := path.relative_to(ROOT).as_posix()) not in TEACHER_FACT_MODULES and rel.split("/")[0] != "tests"
           for line, value in teacher_facts(path, names)]
    assert not bad, ("teacher facts written outside teachers/descriptors.py (read them from its descriptors, or mark "
                     f"a coincidence '{NOT_A_TEACHER_FACT}'):\n  " + "\n  ".join(bad))


# Plumbing lives in the bottom layer: durable writes and seed derivations are core's (core/io.py,
# core/keys.py), so a package above calls them instead of growing its own copy.
PLUMBING_CALLS = {("os", "fsync"), ("os", "fdatasync"), ("random", "SeedSequence")}
PLUMBING_DEFS = ("atomic", "fsync", "sha256_file", "file_digests", "hash_keys", "derive_seed", "name_seed")


def plumbing_outside_core() -> list[str]:
    found = []
    for name, path in MODULES.items():
        if name.split(".")[0] == "core":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = node.func.value
                owner_name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
                if (owner_name, node.func.attr) in PLUMBING_CALLS:
                    found.append(f"{where(name)}:{node.lineno} calls {owner_name}.{node.func.attr}")
            elif isinstance(node, ast.FunctionDef) and any(p in node.name for p in PLUMBING_DEFS):
                found.append(f"{where(name)}:{node.lineno} defines {node.name}")
    return sorted(found)


def test_durable_writes_digests_and_seeds_are_defined_only_in_core():
    found = plumbing_outside_core()
    assert not found, "plumbing outside core/ (use core/io.py or core/keys.py):\n" + "\n".join(found)
