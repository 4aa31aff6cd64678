"""The parts of mixq depend one way (README "Architecture", ../shared/DESIGN.md).

Every import of every module is read from the source (imports inside functions included) and
checked against the layers below: a module may import modules of a lower layer, or of its own
layer *and* its own subpackage; never a higher layer, and no import circle at all.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mixq"

#: (layer, module-name prefixes), lowest first: the order of README's architecture section.
LAYERS = [
    ("base", ("mixq.config", "mixq.validation", "mixq.data")),
    ("quantizers", ("mixq.quant", "mixq.outliers")),
    ("reference", ("mixq.reference",)),
    ("kernels", ("mixq.kernels",)),
    ("nn", ("mixq.nn",)),
    ("hf", ("mixq.hf",)),
    ("calibrate", ("mixq.calibrate",)),
    ("methods", ("mixq.methods",)),
    ("offline", ("mixq.api", "mixq.eval", "mixq.presets", "mixq.mnist")),
    ("io", ("mixq.io",)),
    ("experiments", ("mixq.experiments",)),
    ("cli", ("mixq.__main__",)),
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every mixq module `path` imports, at any depth of the code (functions included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}   # `from mixq import nn`
    return {m for m in found if m == "mixq" or m.startswith("mixq.")}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        graph[name] = {m for m in _imports(path) if m in files and m != name}
    return graph


def _layer(module: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py: add it")


def _subpackage(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


GRAPH = _graph()


def test_every_module_has_a_layer():
    for module in GRAPH:
        if module != "mixq":
            _layer(module)


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m != "mixq"))
def test_imports_point_down(module):
    up = []
    for dep in sorted(GRAPH[module]):
        if dep == "mixq":          # the package face: imports only mixq.config (checked below)
            continue
        same_place = _layer(dep) == _layer(module) and _subpackage(dep) == _subpackage(module)
        if _layer(dep) > _layer(module) or (_layer(dep) == _layer(module) and not same_place):
            up.append(f"{dep} ({LAYERS[_layer(dep)][0]})")
    assert not up, f"{module} ({LAYERS[_layer(module)][0]}) imports upward or sideways: {up}"


def test_package_face_imports_only_the_configs():
    assert GRAPH["mixq"] == {"mixq.config"}


def test_kernels_import_only_the_reference_layer():
    allowed = ("mixq.config", "mixq.quant", "mixq.reference", "mixq.validation", "mixq.outliers",
               "mixq.kernels")
    for module, deps in GRAPH.items():
        if module.startswith("mixq.kernels"):
            bad = [d for d in deps - {"mixq"}
                   if not any(d == a or d.startswith(a + ".") for a in allowed)]
            assert not bad, f"{module} imports {bad}"


def test_reference_never_imports_triton_or_kernels():
    for path in (PACKAGE / "reference").rglob("*.py"):
        imported = {a.name for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.Import) for a in node.names}
        imported |= {node.module or "" for node in ast.walk(ast.parse(path.read_text()))
                     if isinstance(node, ast.ImportFrom)}
        assert not {m for m in imported if m.split(".")[0] == "triton"}, path
        assert not GRAPH[_module_name(path)] & {m for m in GRAPH if m.startswith("mixq.kernels")}


def test_no_import_circle():
    state: dict[str, int] = {}          # 1 = on the current path, 2 = done

    def visit(node, path):
        state[node] = 1
        for dep in sorted(GRAPH[node]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
