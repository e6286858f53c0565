"""The package layout DESIGN.md maps: the public names, and which package may import which."""

import ast
import importlib
import pathlib
import pkgutil

import t5kit

SRC = pathlib.Path(t5kit.__file__).parent

# DESIGN.md, "Layout": what each part may import (besides itself and the stdlib helpers below).
MAY_IMPORT = {
    "model": set(),
    "data": {"model"},
    "inference": {"model", "data"},
    "training": {"model", "data"},
    "jobs": {"model", "data", "inference", "training"},
    "serving": {"model", "data", "inference"},
}
HELPERS = {"atomic", "options"}  # stdlib-only modules at the top, importable from every part
TOP = {"__init__", "__main__", "cli"} | HELPERS

# The stable public API (README, "Python API"): written out here, so that a name that disappears fails.
PUBLIC = {
    "T5": type, "T5Encoder": type, "T5Config": type, "get_preset": "function", "PRESETS": dict,
    "Tokenizer": type, "train_tokenizer": "function",
    "GenerationConfig": type, "for_inference": "function", "quantize_int8": "function",
    "pretrain": "function", "PretrainConfig": type, "finetune": "function", "FinetuneConfig": type,
    "evaluate": "function", "EvalConfig": type, "embed": "function", "EmbedConfig": type,
    "demo": "function", "DemoConfig": type, "export": "function", "ExportConfig": type,
    "serve": "function", "ServeConfig": type,
}


def _modules():
    """(dotted name under t5kit, path) of every module of the package."""
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        yield ".".join(parts), path


def _imports(module: str, path: pathlib.Path):
    """The t5kit modules `module` imports, absolute, relative ones resolved (function-local too)."""
    package = module.split(".")[:-1]  # an __init__ is named by its package: "model.__init__"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)]
            target = base + (node.module.split(".") if node.module else [])
            if node.module:
                yield ".".join(target)
            else:
                yield from (".".join(target + [a.name]) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("t5kit"):
            yield node.module.removeprefix("t5kit").lstrip(".")
        elif isinstance(node, ast.Import):
            yield from (a.name.removeprefix("t5kit.") for a in node.names if a.name.startswith("t5kit."))


def test_every_module_lives_in_a_part():
    for module, path in _modules():
        part = module.split(".")[0]
        assert part in MAY_IMPORT or module in TOP, f"{path}: put it in one of {sorted(MAY_IMPORT)}"


def test_package_import_rules():
    """A part imports only itself, the parts below it (MAY_IMPORT) and the helpers; nothing imports cli."""
    for module, path in _modules():
        part = module.split(".")[0]
        for dep in _imports(module, path):
            top = dep.split(".")[0]
            assert top != "cli" or module == "__main__", f"{module} imports cli"
            if module in TOP:
                continue
            if part in HELPERS:
                assert not dep, f"{module} is a stdlib-only helper but imports t5kit.{dep}"
                continue
            ok = top == part or top in MAY_IMPORT[part] or top in HELPERS
            assert ok, f"{module} imports t5kit.{dep}: {part} may import only {sorted(MAY_IMPORT[part]) or 'nothing'}"


def test_public_api_by_name():
    for name, kind in PUBLIC.items():
        obj = getattr(t5kit, name)
        if kind == "function":
            assert callable(obj) and not isinstance(obj, type), f"t5kit.{name} should be a function"
        else:
            assert isinstance(obj, kind), f"t5kit.{name} should be a {kind.__name__}, got {type(obj).__name__}"
        assert name in t5kit.__all__, f"t5kit.{name} is missing from __all__"
    exec(f"from t5kit import {', '.join(PUBLIC)}", {})


def test_public_names_survive_importing_every_submodule():
    """Importing a submodule binds its name on its package; no module may shadow a public name
    (a `demo.py` once turned `t5kit.demo` into a module once the CLI had been imported)."""
    for info in pkgutil.walk_packages(t5kit.__path__, "t5kit."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    for name in t5kit.__all__:
        obj = getattr(t5kit, name)
        assert not isinstance(obj, type(t5kit)), f"t5kit.{name} is the module {obj.__name__}, not the public object"
