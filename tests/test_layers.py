"""The layer rule of docs/ARCHITECTURE.md ("Layers"), read from the source with ``ast``.

Bottom to top: the Hub pipeline package (and the runtime networks it must load) -> core -> training scripts ->
commands -> benchmarks. No module imports a module of a layer above its own (imports inside functions count too),
the diffad modules import each other without a cycle, and the pipeline package imports only torch, diffusers,
numpy, the standard library and the runtime networks (``inspection.py`` also Pillow). Its ``pipeline.py`` and the
siblings it imports ship in every Hub repo as diffusers remote code (``tests/test_pipeline.py`` holds them to torch,
diffusers and numpy), and ``inspection.py`` as the repo's ``handler.py``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Layer of every module, bottom first: a module named here, or inside a package named here, has that layer.
LAYERS: dict[str, tuple[str, ...]] = {
    "pipeline": ("diffad.pipelines", "diffad.networks"),
    "core": ("diffad", "diffad.data", "diffad.synthetic", "diffad.anomalies", "diffad.metrics",
             "diffad.presets", "diffad.precision", "diffad.training_utils",
             "diffad.files", "diffad.errors",
             "diffad.figures", "diffad.model_folder", "diffad.defects", "diffad.inputs", "diffad.results"),
    "training": ("diffad.training",),
    "commands": ("diffad.cli", "diffad.calibration", "diffad.detect", "diffad.evaluation", "diffad.cards", "diffad.hub", "diffad.export",
                 "diffad.app", "diffad.demo", "diffad.serve", "diffad.watch", "diffad.webhook", "diffad.workflow",
                 "diffad.listen", "diffad.launch"),
    "benchmarks": ("benchmarks",),
}
RANK = {name: i for i, name in enumerate(LAYERS)}
#: Where each installed package lives in the checkout (pyproject's package mapping).
SOURCES = {"diffad": ROOT / "src" / "diffad", "diffad.pipelines": ROOT / "pipelines",
           "diffad.training": ROOT / "training", "benchmarks": ROOT / "benchmarks"}
#: What the pipeline package may import besides the standard library and itself.
#: PIL: diffusers' own dependency, which inspection.py (every Hub repo's handler.py) decodes uploaded photos with.
PIPELINE_ALLOWED = ("torch", "diffusers", "numpy", "diffad.networks", "PIL")


def _modules() -> dict[str, Path]:
    """``{dotted module name: file}`` of every Python module of the checkout's packages and benchmarks."""
    found = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _layer(module: str) -> str:
    best = max(((prefix, layer) for layer, prefixes in LAYERS.items() for prefix in prefixes
                if module == prefix or (module.startswith(prefix + ".") and prefix != "diffad")),
               key=lambda item: len(item[0]), default=None)
    if best is None:
        pytest.fail(f"{module} has no layer: add it to LAYERS here and to docs/ARCHITECTURE.md")
    return best[1]


def _imports(module: str, path: Path) -> list[tuple[str, int]]:
    """``(imported module, line)`` of every import in ``path``, module level and inside functions; ``from X import
    Y`` counts as ``X.Y`` when that is a module of the checkout, else as ``X``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((full if full in MODULES else base, node.lineno))
    return found


def _diffad_imports(module: str) -> list[tuple[str, int]]:
    return [(name, line) for name, line in _imports(module, MODULES[module])
            if name == "diffad" or name.startswith("diffad.")]


def test_every_module_has_a_layer():
    assert "diffad.pipelines.self_aware_inpaint.pipeline" in MODULES and "diffad.cli" in MODULES
    for module in MODULES:
        _layer(module)


def test_no_module_imports_a_layer_above_its_own():
    violations = [f"{MODULES[module].relative_to(ROOT)}:{line}: {module} ({_layer(module)}) imports {target} "
                  f"({_layer(target)})"
                  for module in MODULES for target, line in _diffad_imports(module)
                  if RANK[_layer(target)] > RANK[_layer(module)]]
    assert not violations, "\n".join(violations)


def test_the_pipeline_package_imports_only_torch_diffusers_numpy_and_the_runtime_networks():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    bottom = [m for m in MODULES if _layer(m) == "pipeline"]
    assert "diffad.networks" in bottom and "diffad.pipelines.self_aware_inpaint" in bottom
    violations = []
    for module in bottom:
        for target, line in _imports(module, MODULES[module]):
            own = target.startswith("diffad.pipelines")
            allowed = any(target == a or target.startswith(a + ".") for a in PIPELINE_ALLOWED)
            if not (own or allowed or target.split(".")[0] in stdlib):
                violations.append(f"{MODULES[module].relative_to(ROOT)}:{line}: {target}")
    assert not violations, "\n".join(violations)
    for target, line in _imports("diffad.networks", MODULES["diffad.networks"]):  # it imports nothing of diffad
        assert not target.startswith("diffad"), f"src/diffad/networks.py:{line}: {target}"


def test_the_diffad_modules_import_each_other_without_a_cycle():
    graph = {m: {t for t, _ in _diffad_imports(m) if t in MODULES and t != m} for m in MODULES}
    done: set[str] = set()

    def visit(module: str, stack: list[str]) -> None:
        for target in sorted(graph[module]):
            if target in stack:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(target):] + [target]))
            if target not in done:
                visit(target, stack + [target])
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
