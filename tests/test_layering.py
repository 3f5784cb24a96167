"""The line between the library and its tooling: no library module loads the kernel benchmarks
(torchquant.bench) when it is imported; `torchquant bench` imports them when it runs."""
import ast
import pathlib

import torchquant
from conftest import run_python_child

PACKAGE = pathlib.Path(torchquant.__file__).parent


def _imported_modules(node: ast.AST, module: str):
    """The absolute names of the modules an import statement in `module` (dotted) loads."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:  # relative: resolved against the importing module's package
            base = module.split(".")[:-node.level]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        return [source] + [f"{source}.{alias.name}" for alias in node.names]
    return []


def _import_time_imports(tree: ast.Module, module: str):
    """Imports that run when the module is imported: every statement outside function bodies (classes, if/try
    blocks and the module body run at import)."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        yield from ((node.lineno, name) for name in _imported_modules(node, module))
        pending.extend(ast.iter_child_nodes(node))


def _loads_bench(name: str) -> bool:
    return name == "torchquant.bench" or name.startswith("torchquant.bench.")


def test_no_library_module_imports_the_benchmarks_at_import_time():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent)
        if relative.parts[1] == "bench":
            continue
        module = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        for line, name in _import_time_imports(ast.parse(path.read_text(), str(path)), module):
            if _loads_bench(name):
                offenders.append(f"{relative}:{line} imports {name}")
    assert offenders == []


def test_the_import_finder_sees_each_form_of_import():
    """The finder above must catch what it looks for (a test that cannot fail proves nothing)."""
    source = ("import torchquant.bench\nfrom torchquant import bench\nfrom .bench import layers\n"
              "from . import bench\ntry:\n    from torchquant.bench.gpu import run\nexcept ImportError:\n    pass\n"
              "def lazy():\n    import torchquant.bench\n")
    found = [line for line, name in _import_time_imports(ast.parse(source), "torchquant.cli") if _loads_bench(name)]
    assert sorted(set(found)) == [1, 2, 3, 4, 6]


def test_importing_the_command_line_does_not_load_the_benchmarks():
    out = run_python_child(
        "import sys\nimport torchquant.cli\ntorchquant.cli.build_parser()\n"
        "print(sorted(name for name in sys.modules if name.startswith('torchquant.bench')))")
    assert out.strip().splitlines()[-1] == "[]"
