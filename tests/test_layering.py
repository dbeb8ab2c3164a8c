"""vdiff's import layering: a module imports only from its own layer or layers below it.

``LAYERS`` is the layer order (cite it from the docs). A module belongs to the longest key that
prefixes its dotted name: ``vdiff.data.convert.cityscapes`` is in ``vdiff.data``; ``vdiff.cli``,
``vdiff.sample``, ``vdiff.encode`` and any other ``vdiff/*.py`` fall to the key ``vdiff`` (the top).
``vdiff/__init__.py`` itself is ``vdiff.__init__``: Python runs it before every vdiff module, so it
sits at the bottom and may import nothing from vdiff; so does ``vdiff.errors`` (a module, not a package).

Packages with the same rank are siblings that may not import each other: ``vdiff.models`` and
``vdiff.diffusion`` are independent (the diffusion core knows no model, and the networks know no process), and
so are ``vdiff.data``, ``vdiff.metrics`` and ``vdiff.weights`` (none imports another).

``LEAVES`` are packages that nothing outside them imports, whatever its layer: ``vdiff.callbacks`` (recipes name
the callbacks by ``class_path``; the mechanisms they use live below them, so the tools never import a callback).

Every ``.py`` under ``vdiff/`` is parsed with :mod:`ast`; imports at module level, inside functions
and classes and under ``if TYPE_CHECKING:`` all count, relative imports are resolved, and so are
``importlib.import_module("vdiff....")`` / ``__import__("vdiff....")`` calls with literal names.
Nothing is exempt: the test fails listing every upward import as ``path:line imports X (why)``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

# Layer order, bottom (0) to top. Same rank = siblings that may not import each other.
LAYERS: dict[str, int] = {
    "vdiff.__init__": 0,  # vdiff/__init__.py (``__version__``): runs before every vdiff module
    "vdiff.cache": 0,  # the cache root ($VDIFF_CACHE; stdlib only): every layer may use it
    "vdiff.errors": 0,  # which exceptions are user errors (stdlib only): every layer may use it
    "vdiff.nn": 1,  # building blocks: attention, norms, embeddings, resnet blocks
    "vdiff.models": 2,  # plain nn.Module networks: VDT, autoencoders, discriminators (know no process)
    "vdiff.diffusion": 2,  # EDM / DDPM processes, samplers, guidance, masks (know no model)
    "vdiff.data": 3,  # shards, schema, decoding, datamodules, converters (vdiff.data.convert)
    "vdiff.metrics": 3,  # PSNR/SSIM, LPIPS, blob probes
    "vdiff.weights": 3,  # safetensors I/O, checkpoint converters, peft's adapter files
    "vdiff.lit": 4,  # LightningModules, the Lightning CLI, module loading, adapters, scaling
    "vdiff.callbacks": 5,  # Lightning callbacks: EMA, LoRA, sample videos, checkpoint evaluation
    "vdiff": 6,  # top-level tools: vdiff/cli.py, sample.py, encode.py, any other vdiff/*.py
}
# Packages nothing outside them may import (a tool or a module imports the mechanism below, never a callback).
LEAVES: tuple[str, ...] = ("vdiff.callbacks",)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = ROOT / "vdiff"


def module_name(path: Path, package_dir: Path = PACKAGE_DIR) -> str:
    """``vdiff/data/convert/folder.py`` -> ``vdiff.data.convert.folder``; a package's ``__init__.py`` -> the package."""
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    """The ``LAYERS`` key ``module`` belongs to (the longest key that prefixes it)."""
    if module == "vdiff":
        return "vdiff.__init__"
    for key in sorted(LAYERS, key=len, reverse=True):
        if module == key or module.startswith(key + "."):
            return key
    raise KeyError(f"{module} is not under vdiff")


def layer_label(key: str) -> str:
    if key == "vdiff":
        return "top-level vdiff/*.py"
    if key == "vdiff.__init__":
        return "vdiff/__init__.py"
    return key.removeprefix("vdiff.")


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    package = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 > len(package):
        raise ValueError(f"relative import beyond the top package in {module}")
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _literal_str(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _is_import_call(func: ast.AST) -> bool:
    if isinstance(func, ast.Attribute):
        return func.attr == "import_module" and isinstance(func.value, ast.Name) and func.value.id == "importlib"
    return isinstance(func, ast.Name) and func.id in ("import_module", "__import__")


def imported_modules(source: str, module: str, is_package: bool, known: set[str]) -> list[tuple[int, str]]:
    """``(line, dotted module)`` for every vdiff module ``source`` imports, anywhere in the file.

    ``from X import a`` counts as importing ``X.a`` when that is a module in ``known``, else ``X``.
    """
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = _resolve_relative(module, is_package, node.level, node.module)
            for alias in node.names:
                child = f"{base}.{alias.name}" if base else alias.name
                found.append((node.lineno, child if child in known else base))
        elif isinstance(node, ast.Call) and _is_import_call(node.func) and node.args:
            name = _literal_str(node.args[0])
            if name is None:
                continue  # a computed name (e.g. a class_path from a config): nothing to check statically
            if name.startswith("."):
                package = _literal_str(node.args[1]) if len(node.args) > 1 else None
                package = package or next((_literal_str(k.value) for k in node.keywords if k.arg == "package"), None)
                if package is None:
                    continue
                level = len(name) - len(name.lstrip("."))
                name = _resolve_relative(package, True, level, name.lstrip(".") or None)
            found.append((node.lineno, name))
    return sorted({(line, name) for line, name in found if name == "vdiff" or name.startswith("vdiff.")})


def upward_imports(source: str, module: str, path: str, is_package: bool, known: set[str]) -> list[str]:
    """One line per import of ``source`` that goes to a higher layer, to a sibling package, or into a leaf
    package (``LEAVES``) from outside it."""
    own = layer_of(module)
    problems = []
    for line, target in imported_modules(source, module, is_package, known):
        other = layer_of(target)
        if other == own:
            continue
        if other in LEAVES:
            problems.append(f"{path}:{line} imports {target} (nothing outside {layer_label(other)} may import it)")
            continue
        if LAYERS[other] < LAYERS[own]:
            continue
        relation = "above" if LAYERS[other] > LAYERS[own] else "a sibling of"
        problems.append(f"{path}:{line} imports {target} ({layer_label(other)} is {relation} {layer_label(own)})")
    return problems


def source_files() -> list[Path]:
    return sorted(PACKAGE_DIR.rglob("*.py"))


def known_modules(files: list[Path]) -> set[str]:
    return {module_name(p) for p in files}


def test_no_upward_imports():
    files = source_files()
    known = known_modules(files)
    problems = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        problems += upward_imports(path.read_text(), module_name(path), rel, path.name == "__init__.py", known)
    if problems:
        pytest.fail(f"{len(problems)} imports break the layer order {LAYERS}:\n" + "\n".join(problems), pytrace=False)


def test_every_subpackage_has_a_layer():
    """A new subpackage must be placed in LAYERS, not silently fall to the top level."""
    packages = {module_name(p.parent / "__init__.py") for p in PACKAGE_DIR.glob("*/__init__.py")}
    missing = sorted(p for p in packages if p not in LAYERS)
    assert not missing, f"add {missing} to LAYERS in tests/test_layering.py"
    modules = known_modules(source_files())
    stale = sorted(k for k in LAYERS if k not in packages | modules and k not in ("vdiff", "vdiff.__init__"))
    assert not stale, f"LAYERS names packages that do not exist: {stale}"


def test_the_checker_reports_upward_imports():
    """The checker itself, on a synthetic module: so the main test cannot pass by finding nothing."""
    known = {
        "vdiff", "vdiff.nn", "vdiff.nn.attention", "vdiff.models", "vdiff.models.fake", "vdiff.models.vdt",
        "vdiff.weights", "vdiff.weights.autoencoder_convert", "vdiff.lit", "vdiff.lit.base",
        "vdiff.callbacks", "vdiff.callbacks.ema", "vdiff.data", "vdiff.data.shards", "vdiff.metrics",
        "vdiff.metrics.frames", "vdiff.cli",
    }
    source = '''
import importlib
import os
from vdiff import __version__
from vdiff.nn import attention
from . import vdt
from .vdt import VDT

def load():
    from vdiff.weights.autoencoder_convert import load_autoencoder_state_dict
    return load_autoencoder_state_dict

class Thing:
    def method(self):
        from ..lit import base
        import vdiff.callbacks.ema
        return importlib.import_module("vdiff.cli")

def other():
    return importlib.import_module(".frames", "vdiff.metrics"), importlib.import_module(os.environ["X"])
'''
    problems = upward_imports(source, "vdiff.models.fake", "vdiff/models/fake.py", False, known)
    assert problems == [
        "vdiff/models/fake.py:10 imports vdiff.weights.autoencoder_convert (weights is above models)",
        "vdiff/models/fake.py:15 imports vdiff.lit.base (lit is above models)",
        "vdiff/models/fake.py:16 imports vdiff.callbacks.ema (nothing outside callbacks may import it)",
        "vdiff/models/fake.py:17 imports vdiff.cli (top-level vdiff/*.py is above models)",
        "vdiff/models/fake.py:20 imports vdiff.metrics.frames (metrics is above models)",
    ]
    sibling = upward_imports("from vdiff.data.shards import x\n", "vdiff.metrics.frames", "m.py", False, known)
    assert sibling == ["m.py:1 imports vdiff.data.shards (data is a sibling of metrics)"]
    # The networks and the diffusion core know nothing of each other, either way.
    known |= {"vdiff.diffusion", "vdiff.diffusion.edm"}
    assert upward_imports("from vdiff.models.vdt import VDT\n", "vdiff.diffusion.edm", "d.py", False, known) == [
        "d.py:1 imports vdiff.models.vdt (models is a sibling of diffusion)"
    ]
    assert upward_imports("from ..diffusion import edm\n", "vdiff.models.fake", "f.py", False, known) == [
        "f.py:1 imports vdiff.diffusion.edm (diffusion is a sibling of models)"
    ]
    # A top-level tool may import anything but a callback; callbacks import each other; the bottom imports nothing.
    top = "from vdiff.callbacks import ema\nimport vdiff.lit.base\n"
    assert upward_imports(top, "vdiff.cli", "c.py", False, known) == [
        "c.py:1 imports vdiff.callbacks.ema (nothing outside callbacks may import it)"
    ]
    lazy = "def f():\n    return importlib.import_module('vdiff.callbacks')\n"
    assert upward_imports(lazy, "vdiff.lit.base", "l.py", False, known) == [
        "l.py:2 imports vdiff.callbacks (nothing outside callbacks may import it)"
    ]
    assert upward_imports("from . import ema\nimport vdiff.lit.base\n", "vdiff.callbacks.lora", "x.py", False, known) == []
    assert upward_imports("from vdiff.nn import attention\n", "vdiff", "vdiff/__init__.py", True, known) == [
        "vdiff/__init__.py:1 imports vdiff.nn.attention (nn is above vdiff/__init__.py)"
    ]


@pytest.mark.parametrize(
    ("module", "layer"),
    [
        ("vdiff.data.convert.cityscapes", "vdiff.data"),
        ("vdiff.datax", "vdiff"),  # prefix match is per dotted component
        ("vdiff.cli", "vdiff"),
        ("vdiff", "vdiff.__init__"),
        ("vdiff.lit.cli", "vdiff.lit"),
    ],
)
def test_layer_of(module, layer):
    assert layer_of(module) == layer
