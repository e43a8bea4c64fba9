"""The import graph of the project's own modules (docs/architecture.md): no module imports one that
imports it back, and every package imports only the packages below it. Imports inside functions
count too: a lazy import is still a dependency."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Top to bottom: a package may import the packages of the layers below its own, and nothing of
# its own layer or above. extract runs networks and stores arrays; results computes metrics and
# tables from arrays; methods scores (through extract when it needs the network) and may use
# results' metrics to tune itself; harness drives them all. benchmarks is data.
LAYERS = (("harness",), ("methods",), ("extract", "results"), ("benchmarks",))
PACKAGES = tuple(package for layer in LAYERS for package in layer)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, list[tuple[str, str]]]:
    """module -> [(imported project module, 'file:line')] for every import statement anywhere in it."""
    files = {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}
    graph = {}
    for module, path in files.items():
        edges = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                assert node.level == 0, f"{where}: relative import; this project imports by absolute names"
                # `from package import module` depends on that module; `from module import name` on the module
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in files else node.module
                           for alias in node.names]
            edges += [(target, where) for target in targets if target.partition(".")[0] in PACKAGES]
        graph[module] = list(dict.fromkeys(edges))  # `from m import a, b` is one dependency
    return graph


def package_imports() -> list[tuple[str, str, str]]:
    """(file:line, importing package, imported module) for every import of another package's module."""
    return [(where, module.partition(".")[0], target)
            for module, edges in import_graph().items() for target, where in edges
            if module.partition(".")[0] != target.partition(".")[0]]


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    state = {}  # module -> "open" while on the path being explored, "done" once explored

    def visit(module, path):  # path: (module, 'file:line imports target') steps from the first module
        state[module] = "open"
        for target, where in graph.get(module, ()):
            steps = path + [(module, f"{where} imports {target}")]
            if state.get(target) == "open":
                start = next(i for i, (step_module, _) in enumerate(steps) if step_module == target)
                raise AssertionError("import cycle:\n  " + "\n  ".join(line for _, line in steps[start:]))
            if target not in state:
                visit(target, steps)
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [])


def test_every_package_imports_only_the_packages_below_it():
    level = {package: depth for depth, layer in enumerate(LAYERS) for package in layer}
    wrong = []
    for where, source, target in package_imports():
        if level[target.partition(".")[0]] <= level[source]:
            below = ", ".join(p for p in PACKAGES if level[p] > level[source]) or "nothing of this project"
            wrong.append(f"{where} imports {target}: {source} may import only {below}")
    assert not wrong, (f"imports against the layering ({' > '.join('/'.join(layer) for layer in LAYERS)}, "
                       "top to bottom; docs/architecture.md):\n  " + "\n  ".join(wrong))
