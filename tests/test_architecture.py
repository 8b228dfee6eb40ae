"""The package's dependency rules, checked on the source's import statements (pure AST: nothing is
imported, so this runs in well under a second).

- ``diffmoe.model`` and ``diffmoe.generation`` import no Ray, DeepSpeed, HTTP server stack or MLflow
  at module level (anywhere, for all but MLflow: ``model.source`` imports it when it downloads).
- Packages only import downward (``LAYERS``): serve never imports train, evaluate never imports
  serve, generation neither, parallel neither; a new package must be placed in ``LAYERS``.
- No import cycle among diffmoe modules through module-level imports; a cycle that closes only
  through a function-local import must be listed in ``LOCAL_CYCLES`` with its reason (none today).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

PLATFORM = Path(__file__).resolve().parent.parent / "platform"

# Lower layers never import higher ones; packages in the same layer do not import each other.
LAYERS = {
    "diffmoe": 0,  # the package root (__version__)
    "diffmoe.config": 0,  # the one config system
    "diffmoe.rng": 0,  # generators made on the tensors' device
    "diffmoe.cluster": 0,  # connecting a driver to Ray (ray imported inside the function)
    "diffmoe.model": 1,  # the model, its checkpoints and sources: torch + transformers only
    "diffmoe.data": 1,
    "diffmoe.jobs": 1,  # the job runner: config only, no Ray
    "diffmoe.tracking": 1,  # the MLflow helper (mlflow imported inside functions)
    "diffmoe.diffusion": 1,
    "diffmoe.generation": 2,  # decoding engine, shared by serve, evaluate and bench
    "diffmoe.parallel": 2,  # DeepSpeed-MoE beside the model, shared by train and serve
    "diffmoe.train": 3,
    "diffmoe.serve": 3,
    "diffmoe.evaluate": 3,
    "diffmoe.harness": 3,  # lm-evaluation-harness model, tasks and job
    "diffmoe.bench": 4,
    "diffmoe.demo": 4,
}
HEAVY = {"ray", "deepspeed", "fastapi", "starlette", "uvicorn", "mlflow"}
# (package, third-party module) pairs allowed inside functions, never at module level.
LAZY_ONLY = {("diffmoe.model", "mlflow")}
PURE = {"diffmoe.model", "diffmoe.generation"}
# Frozensets of modules whose cycle closes only through a function-local import, with the reason.
LOCAL_CYCLES: dict[frozenset[str], str] = {}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (a diffmoe submodule when the name is one, else the package)
    line: int
    local: bool  # inside a function body: runs on call, not on import


@cache
def modules() -> dict[str, Path]:
    out = {}
    for path in sorted((PLATFORM / "diffmoe").rglob("*.py")):
        parts = path.relative_to(PLATFORM).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(name: str, path: Path) -> list[Import]:
    mods = modules()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: list[Import] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_block(child):
                continue
            if isinstance(child, ast.Import):
                found.extend(Import(name, a.name, child.lineno, local) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from the package, up level - 1 packages
                    assert child.level <= len(package), f"{path}:{child.lineno} imports above diffmoe"
                    base = ".".join(package[: len(package) - child.level + 1] + ([base] if base else []))
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    found.append(Import(name, sub if sub in mods else base, child.lineno, local))
            func = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            visit(child, local or func)

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None) if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name | ast.Attribute) and ast.unparse(test).endswith("TYPE_CHECKING")


@cache
def all_imports() -> list[Import]:
    return [imp for name, path in modules().items() for imp in imports_of(name, path)]


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def where(imp: Import) -> str:
    path = modules()[imp.source].relative_to(PLATFORM.parent)
    return f"{path}:{imp.line} imports {imp.target}{' (in a function)' if imp.local else ''}"


def test_the_import_parser_sees_every_kind_of_import():
    got = {(i.target, i.local) for i in imports_of("diffmoe.serve.host", modules()["diffmoe.serve.host"])}
    assert ("diffmoe.model.source", False) in got  # absolute from-import of a submodule
    assert ("diffmoe.serve.config", False) in got  # relative from-import of a submodule
    assert ("diffmoe.serve.expert_parallel", True) in got  # relative, inside a method
    assert ("torch", False) in got
    parallel = {i.target for i in imports_of("diffmoe.parallel", modules()["diffmoe.parallel"])}
    assert parallel == {"diffmoe.parallel.moe", "diffmoe.parallel.weights"}  # ``from .moe import ...``
    assert len(modules()) > 50 and len(all_imports()) > 300


def test_model_and_generation_stay_free_of_ray_deepspeed_http_and_mlflow():
    bad = sorted(
        {
            where(i)
            for i in all_imports()
            if package_of(i.source) in PURE
            and i.target.split(".")[0] in HEAVY
            and not (i.local and (package_of(i.source), i.target.split(".")[0]) in LAZY_ONLY)
        }
    )
    assert not bad, "heavy imports in a pure package:\n" + "\n".join(bad)


def test_every_package_has_a_layer():
    missing = sorted({package_of(m) for m in modules()} - set(LAYERS))
    assert not missing, f"place these packages in LAYERS (tests/test_architecture.py): {missing}"


def test_packages_only_import_downward():
    """serve -> train, evaluate -> serve, generation -> serve/train, parallel -> train/serve and
    model -> anything above it all fail here, function-local imports included."""
    bad = []
    for i in all_imports():
        src, dst = package_of(i.source), package_of(i.target)
        if not i.target.startswith("diffmoe") or src == dst or dst not in LAYERS or src not in LAYERS:
            continue
        if LAYERS[dst] >= LAYERS[src] and dst not in ("diffmoe", "diffmoe.config"):
            bad.append(f"{where(i)}: layer {LAYERS[src]} -> {LAYERS[dst]}")
    assert not bad, "imports that do not go downward:\n" + "\n".join(sorted(set(bad)))


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    return found


def _graph(include_local: bool) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for i in all_imports():
        if i.target in modules() and i.target != i.source and (include_local or not i.local):
            edges.setdefault(i.source, set()).add(i.target)
    return edges


def test_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_among_diffmoe_modules():
    cycles = _cycles(_graph(include_local=False))
    assert not cycles, f"module-level import cycles: {cycles}"
    through_local = [c for c in _cycles(_graph(include_local=True)) if frozenset(c) not in LOCAL_CYCLES]
    assert not through_local, (
        f"import cycles closed by function-local imports: {through_local}; break them, or list them "
        "with the reason in LOCAL_CYCLES"
    )
