"""The layers of src/: commands (src/<command>.py, run with python -m) sit on top of the library (the
subpackages); no library module imports a command, and no import cycle exists, counting imports made
inside functions too."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in SRC.rglob("*.py")}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The src modules `path` imports anywhere in its body (top level, functions, strings run with -c excluded)."""
    found = set()
    own = module_name(path) if path.is_relative_to(SRC) else None
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            # the longest known module the name starts with (from src.core import geo -> src.core.geo)
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith("src.") and name in known and name != own:
                found.add(name)
    return found


def is_command(name: str) -> bool:
    """A command is a module file directly in src/ (src/<command>.py), not a package of the library."""
    path = modules().get(name)
    return path is not None and path.parent == SRC and path.name != "__init__.py"


def graph() -> dict[str, set[str]]:
    known = modules()
    names = set(known)
    # a package's __init__ is not an edge target of its own members
    return {name: {m for m in imported_modules(path, names) if not (m in names and known[m].name == "__init__.py"
                                                                    and name.startswith(m + "."))}
            for name, path in known.items()}


def test_every_command_is_a_top_level_module_with_main_and_build_parser():
    commands = [name for name in modules() if is_command(name)]
    assert len(commands) >= 10, commands
    for name in commands:
        tree = ast.parse(modules()[name].read_text())
        defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert {"build_parser", "main"} <= defined, name


def test_no_library_module_imports_a_command():
    offenders = [(name, target) for name, targets in graph().items() if not is_command(name)
                 for target in targets if is_command(target)]
    assert offenders == []


def test_no_command_imports_another_command():
    offenders = [(name, target) for name, targets in graph().items() if is_command(name)
                 for target in targets if is_command(target)]
    assert offenders == []


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle():
    assert find_cycle(graph()) is None


def test_the_cycle_finder_finds_a_planted_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    cycle = find_cycle(edges)
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"}
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_function_level_imports_are_seen(tmp_path):
    known = set(modules())
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from src.inference.engine import session\n    import src.train\n")
    assert imported_modules(probe, known) == {"src.inference.engine", "src.train"}
