"""The house rules of ../shared/DESIGN.md that a machine can check: import direction (lazy imports
inside functions included), no import cycles, no private names across modules, no transformers."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lmforge"

# Lower layers never import higher ones, neither at module level nor inside a function. Generation
# and checkpoint work on any model object (as transformers' GenerationMixin does), so the model can
# offer generate / from_pretrained / save_pretrained with plain imports.
LAYERS = {
    "errors": 0, "_io": 0, "device": 0, "kernels": 0,
    "config": 1, "families": 1, "quantize": 1,
    "corpus": 2, "checkpoint": 2, "tokenizer_base": 2, "tokenizer": 2, "chat_template": 2, "char_tokenizer": 2, "data": 2, "generation": 2,
    "model": 3,
    "training": 4,
    "tasks": 5, "metrics": 5,
    "evaluation": 6,
    "serve": 7, "cli": 7, "__init__": 8, "__main__": 8,
}


def _layer(module: str) -> int:
    top = module.split(".")[1] if module.startswith("lmforge.") else "__init__"
    return LAYERS.get(top, 9)


def _modules():
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        yield ".".join(("lmforge", *parts)) if parts else "lmforge", path


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:]) if "." in name else Path()
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def _imports(path: Path):
    """(imported module, names, line) for every lmforge import in the file, lazy ones included.
    `from lmforge.x import y` counts as importing lmforge.x.y when y is a module."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("lmforge"):
                    yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lmforge") and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                yield (sub, [], node.lineno) if _is_module(sub) else (node.module, [alias.name], node.lineno)


def _graph():
    graph = {}
    for module, path in _modules():
        graph[module] = {name for name, _, _ in _imports(path) if name != module and not module.startswith(name + ".")}
    return graph


def test_imports_point_down_the_stack():
    problems = []
    for module, path in _modules():
        for name, _, line in _imports(path):
            if name != "lmforge" and _layer(name) > _layer(module):
                problems.append(f"{module}:{line} imports higher-level {name}")
    assert not problems, problems


def test_no_import_cycles():
    graph = _graph()
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for name in sorted(graph.get(module, ())):
            if name not in graph or name == "lmforge":
                continue  # the package itself re-exports; importing it from below is caught elsewhere
            if state.get(name) == 1:
                cycles.append(" -> ".join(path[path.index(name):] + [name]))
            elif name not in state:
                visit(name, path + [name])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_no_private_names_across_modules():
    offenders = []
    for module, path in _modules():
        for name, names, line in _imports(path):
            offenders += [f"{module}:{line} imports {name}.{n}" for n in names if n.startswith("_") and n != "__version__"]
    assert not offenders, offenders


def test_package_never_imports_transformers():
    offenders = []
    for module, path in _modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "transformers" for a in node.names):
                offenders.append(module)
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "transformers":
                offenders.append(module)
    assert not offenders


def test_import_has_no_side_effects():
    code = ("import sys, torch; n = torch.get_num_threads(); import lmforge; "
            "assert torch.get_num_threads() == n; "
            "assert 'transformers' not in sys.modules and 'huggingface_hub' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
