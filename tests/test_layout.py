"""The layout a reader relies on (README, The files): no import loop inside minivit, the library core never imports
a command-line tool, and imports sit at the top of each file except the optional heavy ones deferred on purpose."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# deferred on purpose, each said where it is imported: plotting and the digits data set cost ~0.5-1 s to import and
# only some commands need them; fcntl and triton are absent on some platforms
DEFERRED = ("matplotlib", "sklearn", "fcntl", "triton")


def module_imports():
    """{module: [(imported minivit module, lineno, at top level?)]} for every file of minivit/."""
    graph = {}
    for path in sorted((ROOT / "minivit").rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        edges = []
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body} | {id(n) for t in tree.body if isinstance(t, ast.Try) for n in t.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [f"{node.module}.{a.name}" if node.module == "minivit" else node.module for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            edges += [(n, node.lineno, id(node) in top) for n in names]
        graph[name] = edges
    return graph


def test_no_import_loop_and_the_core_never_imports_a_tool():
    graph = {m: {n for n, _, _ in edges if n.startswith("minivit")} for m, edges in module_imports().items()}
    graph = {m: {n for n in deps if n in graph} for m, deps in graph.items()}

    def reach(start):
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += graph[m]
        return seen

    loops = [m for m in graph if m in reach(m)]
    assert not loops, f"import loops through {loops}"
    core = [m for m in graph if not m.startswith("minivit.tools")]
    assert not {m: d for m in core for d in graph[m] if d.startswith("minivit.tools")}


def test_imports_are_at_the_top():
    inside = [f"{m}:{line} imports {n}" for m, edges in module_imports().items() for n, line, top in edges
              if not top and not n.startswith(DEFERRED)]
    assert not inside, inside
