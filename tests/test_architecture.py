"""The package is layered: every import (function-level ones included) points down the layer list, and no set
of modules imports each other in a cycle. The layers are documented in docs/architecture.md."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Lowest first. A module may import from its own layer (without a cycle) and from the layers below it.
LAYERS: list[tuple[str, set[str]]] = [
    ("constants and errors", {"uti_peft.constants", "uti_peft.errors"}),
    ("token space and utilities", {"uti_peft.token_space", "uti_peft.memory", "uti_peft.tiny", "uti_peft.tiny_tokenizer", "uti_peft.output", "uti_peft.files",
                                   "uti_peft.paths", "uti_peft.adapter_location"}),
    ("the PEFT method", {"uti_peft.row_extension"}),
    ("I/O and tasks", {
        "uti_peft.card", "uti_peft.hub", "uti_peft.legacy", "uti_peft.data", "uti_peft.evaluation",
        "uti_peft.generation", "uti_peft.tokenizer", "uti_peft.training", "uti_peft.distributed",
        "uti_peft.output_dir", "uti_peft.demo", "uti_peft.merge", "uti_peft.adapter_folder", "uti_peft.extract",
        "uti_peft.integrations",
    }),
    ("the import hook, which registers the method when peft is first used", {"uti_peft_autoload"}),
    ("command line", {"uti_peft.cli"}),
    ("the package's public names", {"uti_peft"}),
]


def module_files() -> dict[str, Path]:
    files = {"uti_peft_autoload": REPO / "uti_peft_autoload.py"}
    for path in sorted((REPO / "uti_peft").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path
    return files


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports, wherever in the file the import statement is."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from pkg import sub`` imports the submodule when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known)
    found.discard(name)
    return found


def layer_of(name: str) -> int:
    for index, (_, members) in enumerate(LAYERS):
        # a listed package holds its submodules, except the top package, which would hold every module
        if any(name == m or (m != "uti_peft" and name.startswith(m + ".")) for m in members):
            return index
    raise AssertionError(f"{name} is in no layer: add it to LAYERS (and docs/architecture.md)")


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def test_every_import_points_down_the_layers():
    upward = [
        f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
        for a, targets in import_graph().items()
        for b in sorted(targets)
        if layer_of(b) > layer_of(a)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target):], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_a_module_in_no_layer_is_refused():
    with pytest.raises(AssertionError, match="is in no layer"):
        layer_of("uti_peft.some_new_module")
    assert layer_of("uti_peft") == len(LAYERS) - 1 and layer_of("uti_peft.row_extension.model") == 2


def test_the_walker_sees_function_level_and_relative_imports(tmp_path):
    """The checker itself: an import inside a function, relative or absolute, is an edge."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("def f():\n    from .high import g\n    import pkg.other\n")
    known = {"pkg", "pkg.low", "pkg.high", "pkg.other"}
    assert imports_of("pkg.low", package / "low.py", known) == {"pkg.high", "pkg.other"}


def test_only_the_compatibility_module_patches_peft_and_transformers():
    """Assignments to attributes of peft/transformers objects live in row_extension/_compat.py (and the start-up
    hook, which stands in for transformers' load_adapter until uti_peft is registered)."""
    allowed = {"uti_peft.row_extension._compat", "uti_peft_autoload"}
    offenders = []
    for name, path in module_files().items():
        source = path.read_text()
        tree = ast.parse(source)
        imported = {alias.asname or alias.name.split(".")[0]
                    for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                    for alias in node.names
                    if (getattr(node, "module", None) or alias.name).split(".")[0] in ("peft", "transformers")}
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for target in targets:
                if isinstance(target, ast.Attribute):
                    root = target
                    while isinstance(root, ast.Attribute):
                        root = root.value
                    if isinstance(root, ast.Name) and root.id in imported and name not in allowed:
                        offenders.append(f"{name}:{node.lineno} assigns {ast.unparse(target)}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and node.args:
                first = node.args[0]
                if isinstance(first, ast.Name) and first.id in imported and name not in allowed:
                    offenders.append(f"{name}:{node.lineno} setattr on {first.id}")
    assert not offenders, "\n".join(offenders)


def test_every_package_ships_in_the_wheel():
    """setuptools installs the packages pyproject.toml lists, no more: a sub-package missing there is missing from a
    wheel (editable installs and the tests would not notice)."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.relative_to(REPO).parent.parts) for p in (REPO / "uti_peft").rglob("__init__.py")}
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
