"""Imports run one way: pretrain -> parallel -> models -> kernels (and launch on top).

Every import statement of every module counts, also those inside functions (which would
otherwise hide a cycle until the function runs).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["launch", "pretrain", "parallel", "models", "kernels"]  # each imports only those after it
# Known back-edges, each a reason: scale-test sweeps run the launchers for their points.
ALLOWED = {("pretrain/scale_test.py", "launch")}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _modules(package: str) -> dict[str, Path]:
    mods = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def test_layers_import_only_downwards():
    bad = []
    for i, package in enumerate(LAYERS):
        above = set(LAYERS[:i])
        for name, path in _modules(package).items():
            rel = str(path.relative_to(ROOT))
            for imp in _imports(path):
                top = imp.split(".")[0]
                if top in above and (rel, top) not in ALLOWED:
                    bad.append(f"{rel} imports {imp}")
    assert not bad, "\n".join(sorted(set(bad)))
    for rel, top in ALLOWED:  # an entry no longer needed goes
        assert any(i.split(".")[0] == top for i in _imports(ROOT / rel)), (rel, top)


def test_parallel_modules_have_no_import_cycle():
    mods = _modules("parallel")
    graph = {m: {d for d in _imports(p) if d in mods and d not in (m, "parallel")} for m, p in mods.items()}
    done, path = set(), []

    def visit(m):
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for d in sorted(graph[m]):
            visit(d)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)
