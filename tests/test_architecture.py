"""The house rules of ../shared/DESIGN.md that a machine can check: import direction, no transformers."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lmforge"

# Lower layers never import higher ones (module-level imports; a lazy import inside a function may
# call up, e.g. GPT.save_pretrained -> checkpoint).
LAYERS = {
    "errors": 0, "_io": 0, "device": 0,
    "config": 1,
    "model": 2,
    "corpus": 3, "checkpoint": 3, "tokenizer": 3, "char_tokenizer": 3, "data": 3,
    "generation": 4,
    "training": 5,
    "tasks": 6, "metrics": 6,
    "evaluation": 7,
    "serve": 8, "cli": 8, "__init__": 9, "__main__": 9,
}


def _layer(module: str) -> int:
    top = module.split(".")[1] if module.startswith("lmforge.") else module
    return LAYERS.get(top, 9)


def _modules():
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        yield "lmforge." + ".".join(rel.parts), path


def test_imports_point_down_the_stack():
    problems = []
    for module, path in _modules():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:  # module level only
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name.startswith("lmforge") and name != "lmforge" and _layer(name) > _layer(module):
                    problems.append(f"{module} imports higher-level {name}")
    assert not problems, problems


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
