"""The import graph of latentdiff: no cycle, no import of a higher layer.

Every module under src/latentdiff is parsed with ``ast`` (nothing is imported); every ``import`` and
``from ... import`` statement counts, at module level or inside a function, relative or absolute.
``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``; importing
``a.b.c`` also runs ``a.b`` (a package's ``__init__``), which counts as an edge unless the importer lies
inside that package (Python then has it half-initialised already).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "latentdiff"

# The layers, lowest first: a module may import its own layer (without a cycle) and the layers below it,
# never one above. A name is a top-level module or package of latentdiff; "" is the package's own __init__.
LAYERS = [
    ("errors", "fileio", "dataclass_io", "pngmeta", "devices", "folders",  # the UserError family, atomic writes,
     "recipes"),                                          # typed configs from dicts, run/model folders, recipes
    ("schedules",),                                       # β schedules, timestep spacings, σ grids
    ("likelihood", "resample", "diffusion"),              # the Gaussian diffusion process
    ("nn",),                                              # the networks
    ("data",),                                            # datasets and transforms
    ("spatial", "spatial_image", "layouts", "segmaps"),  # spatial conditions, layouts, map files -> U-Net inputs
    ("guidance", "samplers"),                             # stateless sampling
    ("config",),                                          # typed run configs
    ("first_stage",),                                     # the autoencoder as a product
    ("sample_options",),                                  # the sample options of a pipeline, checked
    ("sample_inputs",),                                   # sampling inputs beyond prompts and labels, checked
    ("pipeline", "tiling"),                               # a trained model as one object; tiled upscaling
    ("interop",),                                         # Stable Diffusion / diffusers checkpoints in and out
    ("eval",),                                            # metrics, oracles, reference statistics
    ("train",),                                           # the training loop and checkpoints
    # the command, the demos, the web page and API
    ("demo", "demo_digits", "cli", "cli_parser", "cli_images", "cli_spatial", "serve", ""),
]
# Inference never needs the training package, whatever the layer order says.
INFERENCE = ("pipeline", "first_stage", "samplers", "nn", "eval", "folders", "interop")


def module_files(src: Path = SRC) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package."""
    out = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name a (possibly relative) ``from X import`` statement names as X."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _ours(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def imports(modules: dict[str, Path], missing: list | None = None) -> dict[str, set[str]]:
    """module -> the latentdiff modules it imports (see the module docstring for what counts). An import of a
    latentdiff module that does not exist is no edge; it is appended to ``missing`` as "importer -> name"."""
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in modules else base)
        edges = set()
        for target in sorted(filter(_ours, targets)):
            if target not in modules:
                if missing is not None:
                    missing.append(f"{name} -> {target}")
                continue
            edges.add(target)
            parent = target.rsplit(".", 1)[0]
            while parent != PACKAGE and not name.startswith(parent + ".") and name != parent:
                edges.add(parent)  # importing a.b.c runs a.b's __init__ first
                parent = parent.rsplit(".", 1)[0]
        edges.discard(name)
        graph[name] = edges
    return graph


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise KeyError(f"{module} is in no layer: add {top!r} to LAYERS in tests/test_architecture.py")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def cycle_edges(graph, component) -> list[str]:
    members = set(component)
    return [f"{a} -> {b}" for a in component for b in sorted(graph[a]) if b in members]


def upward_imports(graph) -> list[str]:
    return [f"{a} -> {b} (layer {LAYERS[layer_of(a)]} imports layer {LAYERS[layer_of(b)]})"
            for a in sorted(graph) for b in sorted(graph[a]) if layer_of(b) > layer_of(a)]


@pytest.fixture(scope="module")
def graph():
    return imports(module_files())


def test_every_module_has_a_layer(graph):
    for module in graph:
        layer_of(module)


def test_every_import_names_a_module():
    missing = []
    imports(module_files(), missing)
    assert not missing, "imports of latentdiff modules that do not exist:\n" + "\n".join("  " + m for m in missing)


def test_no_import_cycle(graph):
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join("  " + ", ".join(cycle_edges(graph, c)) for c in found)


def test_no_upward_import(graph):
    up = upward_imports(graph)
    assert not up, "imports of a higher layer:\n" + "\n".join("  " + e for e in up)


def test_inference_never_imports_train(graph):
    bad = [f"{a} -> {b}" for a in sorted(graph) for b in sorted(graph[a])
           if a.split(".")[1:2] and a.split(".")[1] in INFERENCE and b.split(".")[1:2] == ["train"]]
    assert not bad, "inference imports the training package:\n" + "\n".join("  " + e for e in bad)


def test_the_checker_sees_function_level_relative_imports_and_package_inits(tmp_path):
    """The walker itself: a cycle through an import inside a function, an upward relative import, a parent
    package's __init__ and ``from pkg import module``."""
    pkg = tmp_path / PACKAGE
    (pkg / "train").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("def f():\n    from .train import loop\n")
    (pkg / "train" / "__init__.py").write_text("from .loop import run\n")
    (pkg / "train" / "loop.py").write_text("from .. import errors\nfrom . import helper\nrun = 1\n")
    (pkg / "train" / "helper.py").write_text("import latentdiff.errors\n")
    g = imports(module_files(tmp_path))
    assert g["latentdiff.errors"] == {"latentdiff.train.loop", "latentdiff.train"}
    assert g["latentdiff.train.loop"] == {"latentdiff.errors", "latentdiff.train.helper"}  # its own package: no edge
    assert g["latentdiff.train"] == {"latentdiff.train.loop"}
    assert cycles(g) == [["latentdiff.errors", "latentdiff.train", "latentdiff.train.helper", "latentdiff.train.loop"]]
    assert [e.split(" (")[0] for e in upward_imports(g)] == [
        "latentdiff.errors -> latentdiff.train", "latentdiff.errors -> latentdiff.train.loop"]
    (pkg / "fileio.py").write_text("from .strict import strict_from_dict\n")  # a module that is gone
    missing = []
    assert imports(module_files(tmp_path), missing)["latentdiff.fileio"] == set()
    assert missing == ["latentdiff.fileio -> latentdiff.strict"]
