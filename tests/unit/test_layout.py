"""Guards on the repository's shape, and the import rules of ../shared/ARCHITECTURE.md read from the code (ast)."""

import ast
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "platform" / "clipdr"

# ARCHITECTURE.md's layers, by the part of clipdr a module belongs to (the module or package directly under
# clipdr; "jobs" is jobs/*.py). A module imports its own layer or lower ones, never a higher one. A new part must
# be placed here: the test fails on a part it does not know.
LAYERS: dict[str, int] = {
    "__init__": 0,  # the package root: only its version
    "config": 0,
    "records": 0,
    "augparams": 0,  # a stored view and its encoding: records store it, augment samples and replays it
    "augment": 0,
    "storage": 0,
    "checkpoint": 0,  # the checkpoint files: training writes them, evaluation, export and the demo read them
    "runstate": 0,  # a resumable job's state beside its output: both Ray jobs keep theirs through it
    "progress": 0,  # the jobs' progress lines
    "accelerators": 0,  # device peaks: both dry runs and the GPU check divide by them
    "stats": 0,  # the bootstrap of a study: pure numpy; evaluation builds its per-sample scores
    "models": 1,
    "losses": 1,
    "tokenizer_assets": 1,  # a model's tokenizer as files for apps: the export writes them
    "quantize": 1,  # fp16 / int8 variants of ONNX graphs: the export writes them, a benchmark measures them
    "coreml": 1,  # Core ML packages of the torch encoders: the export writes them
    "data": 1,
    # Joining a Ray cluster: both Ray jobs need it and may not import each other, so it lives below them (design.md).
    "cluster": 1,
    "reinforce": 2,
    "train": 2,
    "evaluate": 2,
    "tracking": 2,
    "lifecycle": 2,  # the registry gate, on top of tracking; a training run marks its model a candidate
    "export": 2,  # loads models as evaluation does
    # Start points and WiSE-FT: training, evaluation and export interpolate with a run's start. It reads MLflow
    # starts through tracking, so it shares their layer; below them in the import graph (the cycle check holds it).
    "wiseft": 2,
    "serving": 2,  # `clipdr serve`: a registered model on Ray Serve, loaded as tracking loads it
    "inspection": 2,  # `clipdr inspect`: reads a reinforced dataset (records) and replays its views (augment)
    "cli": 3,
    "jobs": 3,
    "demo": 3,  # runs every stage, as cli does
    "study": 3,  # trains a student per mode and seed (as cli does) and reports with clipdr.stats
    "sweep": 3,  # Ray Tune trials, each a training run
    "benchmarks": 3,  # runs the reinforcement and training jobs at toy sizes
}
NEVER_TOGETHER = (("reinforce", "train"),)  # their only contract is records (+ augment)
ONLY_IMPORTER = {"mlflow": {"tracking"}}
# Only the Ray jobs (serving: a Ray Serve deployment), and what launches them, import ray: cluster (joins or starts
# the cluster for both jobs) and the entrypoints of layer 3.
RAY_IMPORTERS = {"reinforce", "train", "cluster", "serving", "cli", "jobs", "demo", "benchmarks", "sweep"}


def module_name(path: Path) -> str:
    """``clipdr.train.loop`` for platform/clipdr/train/loop.py, ``jobs.train`` for jobs/train.py."""
    parts = path.relative_to(REPO / "platform" if path.is_relative_to(PACKAGE) else REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py")) + sorted((REPO / "jobs").glob("*.py"))


def imports_of(source: str, module: str, known: set[str], is_package: bool = False) -> set[str]:
    """Every module ``source`` imports, at the top or inside functions; ``from a import b`` counts as ``a.b`` when
    that is one of the ``known`` modules (a submodule), else as ``a``."""
    found = set()
    tree = ast.parse(source)
    # `if TYPE_CHECKING:` blocks are read by type checkers only: they create no import at run time.
    type_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return found


def part(module: str) -> str:
    """The part of clipdr (a key of `LAYERS`) that ``module`` belongs to; its top-level name if it is not ours."""
    names = module.split(".")
    if names[0] == "jobs":
        return "jobs"
    if names[0] != "clipdr":
        return names[0]
    return names[1] if len(names) > 1 else "__init__"


def _ours(module: str) -> bool:
    return module.split(".")[0] in ("clipdr", "jobs")


def violations(graph: Mapping[str, Iterable[str]]) -> list[str]:
    """What breaks ARCHITECTURE.md's import rules in ``graph`` (module -> the modules it imports)."""
    found = []
    edges: dict[str, set[str]] = {}
    for module, imported in sorted(graph.items()):
        mine = part(module)
        if mine not in LAYERS:
            found.append(f"{module}: part {mine!r} has no layer in test_layout.LAYERS")
            continue
        for name in sorted(set(imported)):
            theirs = part(name)
            if not _ours(name):
                allowed = ONLY_IMPORTER.get(theirs) or (RAY_IMPORTERS if theirs == "ray" else None)
                if allowed is not None and mine not in allowed:
                    found.append(f"{module} imports {name}: only {sorted(allowed)} may import {theirs}")
                continue
            if theirs == mine:
                continue
            if theirs not in LAYERS:
                found.append(f"{module} imports {name}: part {theirs!r} has no layer in test_layout.LAYERS")
            elif LAYERS[theirs] > LAYERS[mine]:
                found.append(f"{module} (layer {LAYERS[mine]}) imports {name} (layer {LAYERS[theirs]}): upward")
            elif {mine, theirs} in [set(pair) for pair in NEVER_TOGETHER]:
                found.append(f"{module} imports {name}: {mine} and {theirs} never import each other")
            else:
                edges.setdefault(mine, set()).add(theirs)
    found += [f"import cycle between parts: {' -> '.join(cycle)}" for cycle in _cycles(edges)]
    return found


def _cycles(edges: Mapping[str, set[str]]) -> list[list[str]]:
    cycles, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycles.append([*path[path.index(node) :], node])
            return
        if node in done:
            return
        for nxt in sorted(edges.get(node, ())):
            visit(nxt, [*path, node])
        done.add(node)

    for node in sorted(edges):
        visit(node, [])
    return cycles


def import_graph() -> dict[str, set[str]]:
    files = source_files()
    known = {module_name(f) for f in files}
    return {module_name(f): imports_of(f.read_text(), module_name(f), known, f.name == "__init__.py") for f in files}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_imports_follow_the_architecture(graph):
    assert "clipdr.train.run" in graph and "jobs.train" in graph  # the walk found the code
    assert violations(graph) == []


@pytest.mark.parametrize(
    ("module", "source", "message"),
    [
        ("clipdr.models.factory", "def f():\n    import mlflow\n", "only ['tracking'] may import mlflow"),
        ("clipdr.evaluate.run", "from mlflow import MlflowClient\n", "only ['tracking'] may import mlflow"),
        ("clipdr.demo", "from mlflow.entities import Metric\n", "only ['tracking'] may import mlflow"),
        ("clipdr.evaluate.engine", "import ray.data\n", "may import ray"),
        ("clipdr.tracking", "def f():\n    import ray\n", "may import ray"),
        ("clipdr.train.run", "from clipdr.reinforce import pipeline\n", "never import each other"),
        ("clipdr.reinforce.stages", "from clipdr.train.data import ReplayBatch\n", "never import each other"),
        ("clipdr.records", "from clipdr import tracking\n", "upward"),
        ("clipdr.data.sources", "from ..train import data\n", "upward"),
        ("clipdr.train.loop", "from clipdr import cli\n", "upward"),
        ("clipdr.newpart", "import os\n", "no layer"),
    ],
)
def test_a_broken_rule_is_found(graph, module, source, message):
    graph = {**graph, module: imports_of(source, module, set(graph))}
    assert any(message in v for v in violations(graph)), violations(graph)


def test_an_import_cycle_is_found():
    graph: dict[str, set[str]] = {"clipdr.train.run": {"clipdr.tracking"}, "clipdr.tracking": {"clipdr.lifecycle"}}
    graph["clipdr.lifecycle"] = {"clipdr.train.loop"}
    assert violations(graph) == ["import cycle between parts: lifecycle -> train -> tracking -> lifecycle"]


def test_platform_folder_never_becomes_a_package():
    # A package named `platform` would shadow the standard library module of the same name.
    assert not (REPO / "platform" / "__init__.py").exists()
    assert Path(platform.__file__).parent == Path(os.__file__).parent
    out = subprocess.run(
        [sys.executable, "-c", "import platform, clipdr; print(platform.python_version(), clipdr.__file__)"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith(platform.python_version())
    assert "platform/clipdr/__init__.py" in out


def test_core_layers_do_not_import_ray_or_mlflow():
    # L0/L1 modules must import without starting Ray or MLflow, so unit tests stay fast.
    code = (
        "import sys, clipdr.config, clipdr.storage, clipdr.records, clipdr.augment, clipdr.data.sources, "
        "clipdr.data.synthetic, clipdr.checkpoint, clipdr.runstate; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_what_only_moves_records_imports_no_torch():
    # The reinforcement job's writer actors and routing tasks import these alone (`clipdr.reinforce.chunks`); a
    # process that imports torch holds about 600 MiB more before it holds any data.
    code = (
        "import sys, clipdr.records, clipdr.augparams, clipdr.reinforce.chunks; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'open_clip', 'PIL')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
