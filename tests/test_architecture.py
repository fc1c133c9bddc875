"""The layers import downwards only (docs/architecture.md): face (cli) -> pipeline -> reduction / eval / hub. The
modelling code that ships in every saved folder imports nothing of mhacompress."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mhacompress"

# layer of a module (by path prefix, most specific first) -> layers it may import
LAYERS = [
    ("reduction/modeling/", "modeling", set()),
    ("reduction/", "reduction", {"modeling", "errors"}),
    ("devices.py", "errors", set()),  # the bottom: errors, devices and residency (torch only)
    ("residency.py", "errors", set()),
    ("eval/", "eval", {"modeling", "reduction", "errors", "hub"}),
    ("hub.py", "hub", {"modeling", "reduction", "errors"}),
    ("fsio.py", "hub", {"errors"}),
    ("export.py", "hub", {"modeling", "reduction", "errors"}),
    ("bench.py", "hub", {"modeling", "reduction", "errors"}),
    ("errors.py", "errors", set()),
    ("cli/", "cli", {"pipeline", "eval", "hub", "reduction", "modeling", "errors", "root"}),
    ("__main__.py", "cli", {"cli"}),  # `python -m mhacompress`: the face, like the script
    # pipeline, commands, sweep, executors, calibration
    ("", "pipeline", {"eval", "hub", "reduction", "modeling", "errors", "root"}),
]


def layer_of(relative: str) -> tuple[str, set[str]]:
    for prefix, name, allowed in LAYERS:
        if relative.startswith(prefix):
            return name, allowed
    raise AssertionError(relative)


def imported_layers(path: Path) -> set[str]:
    """The layers (by the same table) of every mhacompress module ``path`` imports."""
    tree = ast.parse(path.read_text())
    here = path.relative_to(PACKAGE).parent
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:  # relative
            base = here
            for _ in range(node.level - 1):
                base = base.parent
            target = (base / (node.module or "").replace(".", "/")).as_posix().lstrip("./")
            names = [target] if node.module else [(base / a.name).as_posix().lstrip("./") for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mhacompress"):
            names = [node.module.removeprefix("mhacompress").lstrip(".").replace(".", "/")]
        else:
            continue
        for name in names:
            candidates = [f"{name}.py", f"{name}/"]
            file = next((c for c in candidates if (PACKAGE / c).exists()), None)
            found.add("root" if name in ("", ".") or file is None else layer_of(file)[0])
    return found


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_import_only_the_layers_below_them(path):
    layer, allowed = layer_of(path.relative_to(PACKAGE).as_posix())
    wrong = imported_layers(path) - allowed - {layer}
    assert not wrong, f"{path.relative_to(PACKAGE)} ({layer}) imports {sorted(wrong)}"


def test_the_shipped_modelling_code_imports_only_torch_transformers_and_the_standard_library():
    import sys

    for path in (PACKAGE / "reduction" / "modeling").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                roots = [node.module.split(".")[0]]
            else:
                continue
            for root in roots:
                assert root in {"torch", "transformers", "__future__"} or root in sys.stdlib_module_names, (path, root)


def test_no_library_module_imports_the_cli():
    for path in PACKAGE.rglob("*.py"):
        if layer_of(path.relative_to(PACKAGE).as_posix())[0] != "cli":
            assert "cli" not in imported_layers(path), path
