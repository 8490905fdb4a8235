"""The layering rule: no library module imports the application layer (``diffblend.commands``,
``diffblend.cli``) or the ``zoo`` plug-in, at module level or inside a function; the zoo registers
itself through ``diffblend.registry``. Checked on the source's ast, so lazy imports count too."""

from __future__ import annotations

import ast
from pathlib import Path

import diffblend

SRC = Path(diffblend.__file__).parent
APP = ("diffblend.commands", "diffblend.cli", "diffblend.__main__")
PLUGIN = "diffblend.zoo"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module an import statement of ``path`` names (relative imports resolved; ``from x import y``
    counts x and x.y, since y may be a submodule)."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _layer(mod: str) -> str:
    if any(_under(mod, p) for p in APP):
        return "app"
    return "plugin" if _under(mod, PLUGIN) else "library"


def test_resolves_relative_imports(tmp_path):
    assert _module_name(SRC / "evaluate" / "pipelines.py") == "diffblend.evaluate.pipelines"
    assert "diffblend.core.sampling" in _imports(SRC / "model.py")
    assert "diffblend.zoo" in _imports(SRC / "zoo" / "plugin.py")  # `from . import x` inside the zoo


def test_library_imports_neither_the_app_layer_nor_the_zoo():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        mod = _module_name(path)
        layer = _layer(mod)
        for name in sorted(_imports(path)):
            target = _layer(name) if name.startswith("diffblend") else "external"
            if (layer == "library" and target in ("app", "plugin")) or (layer == "plugin" and target == "app"):
                bad.append(f"{mod} ({layer}) imports {name} ({target})")
    assert not bad, "layering violations:\n" + "\n".join(bad)
