"""The package's shape: imports run down the layers of docs/architecture.md, the command line parses without
JAX, configs and flags match one for one, the code is pyflakes-clean, and a new pruning method is one file."""

from __future__ import annotations

import ast
import dataclasses
import fnmatch
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sparsevlm.cli import _flags, build_parser
from sparsevlm.config import PretrainConfig, PruneConfig, RestoreConfig

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sparsevlm"

# Lowest first. A module may import modules of its own layer (no cycles) or of a lower one, never a higher one.
# docs/architecture.md draws the same table.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundations", ("sparsevlm.tree", "sparsevlm.integrity", "sparsevlm.pruning.registry", "sparsevlm.data.tasks")),
    ("configuration", ("sparsevlm.config",)),
    ("values and data", ("sparsevlm.bundle", "sparsevlm.masks", "sparsevlm.sharding", "sparsevlm.data.*",
                         "sparsevlm.hf.rules", "sparsevlm.hf.safetensors_io", "sparsevlm.hf.processor")),
    ("models", ("sparsevlm.models.*",)),
    ("model functions", ("sparsevlm.losses", "sparsevlm.lora", "sparsevlm.eval.*", "sparsevlm.hf.*",
                         "sparsevlm.checkpoint")),
    ("pruning", ("sparsevlm.pruning.*",)),
    ("training", ("sparsevlm.train", "sparsevlm.trainer", "sparsevlm.pretrain", "sparsevlm.restoration")),
    ("applications", ("sparsevlm.pipeline", "sparsevlm.plan", "sparsevlm.hub", "sparsevlm.jobs", "sparsevlm.cli")),
]
PACKAGES = ("sparsevlm", "sparsevlm.data", "sparsevlm.eval", "sparsevlm.hf", "sparsevlm.models", "sparsevlm.pruning")


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Every module's imports of other package modules, function-level (lazy) imports included."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            found |= {resolve(t) for t in targets if t.startswith("sparsevlm")} - {None, name}
        graph[name] = found
    return graph


def _layer(module: str) -> int:
    for index, (_, patterns) in enumerate(LAYERS):
        # Exact names first: `sparsevlm.hf.rules` sits below the rest of `sparsevlm.hf.*`.
        if module in patterns:
            return index
    for index, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatch(module, p) for p in patterns):
            return index
    raise AssertionError(f"{module} is in no layer of LAYERS (and docs/architecture.md)")


def test_every_module_has_a_layer_and_imports_only_down():
    graph = _imports(_modules())
    upward = [f"{m} ({LAYERS[_layer(m)][0]}) imports {t} ({LAYERS[_layer(t)][0]})"
              for m, targets in graph.items() if m not in PACKAGES for t in targets if _layer(t) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_there_are_no_import_cycles():
    graph = _imports(_modules())
    # Tarjan's strongly connected components: any component of two or more modules is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not cycles, cycles


def test_the_package_inits_import_nothing_eagerly():
    # Importing a light module (the registry, the configs) must not drag in a whole subpackage.
    graph = _imports(_modules())
    eager = {p: sorted(graph[p]) for p in PACKAGES if graph[p]}
    assert not eager, eager


def test_the_command_line_parses_and_shows_help_without_jax():
    code = textwrap.dedent("""
        import contextlib, io, json, sys
        from sparsevlm.cli import build_parser
        parser = build_parser()
        for command in ("pretrain", "evaluate", "prune", "restore", "export", "verify"):
            with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
                parser.parse_args([command, "--help"])
        heavy = ("jax", "flax", "optax", "orbax", "numpy", "datasets", "transformers", "torch")
        print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & set(heavy))))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


@pytest.mark.parametrize("command,config", [("pretrain", PretrainConfig), ("prune", PruneConfig),
                                            ("restore", RestoreConfig)])
def test_config_fields_and_command_flags_match_one_for_one(command, config):
    """Every setting field (nested configs' too) is a flag of its command, and every other flag is a job flag."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    flags = {opt for action in sub._actions for opt in action.option_strings if opt.startswith("--")} - {"--help"}
    made = {flag for flag, _, _ in _flags(config)}
    job_flags = {"pretrain": {"--out", "--mesh", "--eval-images", "--force"},
                 "prune": {"--model", "--mesh", "--eval-images", "--out", "--force"},
                 "restore": {"--model", "--teacher", "--mesh", "--plan", "--eval-images", "--out", "--force"}}[command]
    negations = {f for f in flags if f.startswith("--no-") and "--" + f[len("--no-"):] in made}  # boolean fields
    assert flags - negations == made | job_flags

    def settings(cls: type, prefix: str = "") -> set[str]:
        names = set()
        for field in dataclasses.fields(cls):
            if field.name == "targets":  # LoraConfig's explicit regex rules: Python API only
                continue
            default = field.default_factory() if field.default is dataclasses.MISSING else field.default
            if dataclasses.is_dataclass(default):
                names |= settings(type(default), f"{prefix}{field.name}.")
            else:
                names.add(prefix + field.name)
        return names

    assert {".".join(path) for _, path, _ in _flags(config)} == settings(config)


def test_pretrain_flags_not_given_take_the_tasks_recipe():
    import dataclasses

    from sparsevlm.cli import _pretrain_config
    from sparsevlm.config import pretrain_preset

    parser = build_parser()
    assert _pretrain_config(parser.parse_args(["pretrain"])) == PretrainConfig() == pretrain_preset("shapes")
    scenes = pretrain_preset("scenes")
    assert scenes != PretrainConfig()
    assert _pretrain_config(parser.parse_args(["pretrain", "--task", "scenes"])) == scenes
    given = parser.parse_args(["pretrain", "--task", "scenes", "--steps", "600", "--learning-rate", "1e-3"])
    assert _pretrain_config(given) == dataclasses.replace(scenes, steps=600, learning_rate=1e-3)
    # A boolean field has --x and --no-x; neither given keeps the recipe's value.
    assert scenes.freeze_vision and not PretrainConfig().freeze_vision
    off = parser.parse_args(["pretrain", "--task", "scenes", "--no-freeze-vision"])
    assert _pretrain_config(off) == dataclasses.replace(scenes, freeze_vision=False)
    assert _pretrain_config(parser.parse_args(["pretrain", "--freeze-vision"])).freeze_vision
    # A flag given at the shapes default still wins over the scenes recipe.
    same = parser.parse_args(["pretrain", "--task", "scenes", "--batch-size", str(PretrainConfig().batch_size)])
    assert _pretrain_config(same).batch_size == PretrainConfig().batch_size != scenes.batch_size


def test_the_code_is_pyflakes_clean():
    pyflakes = pytest.importorskip("pyflakes.api")
    from pyflakes.reporter import Reporter
    import io

    out = io.StringIO()
    paths = [str(ROOT / d) for d in ("sparsevlm", "tests", "benchmarks", "experiments")]
    count = pyflakes.checkRecursive(paths, Reporter(out, out))
    assert count == 0, out.getvalue()


METHOD_FILE = '''
"""A pruning method written as the how-to says: keep the weights with the largest |W| times mean |x|."""

import jax.numpy as jnp

from sparsevlm.masks import mask_weights
from sparsevlm.pruning.patterns import select


def prune_layer(kernel, stats, pattern, sparsity, key, options=None):
    if stats is None or stats.total is None:
        raise ValueError("mean-input needs calibration statistics with input sums")
    score = jnp.abs(kernel) * jnp.abs(stats.mean)[:, None]
    keep = select(score, pattern, float(sparsity))
    return mask_weights(kernel, keep), keep
'''


def test_a_new_pruning_method_is_one_file_and_one_registry_line(tiny_bundle, tmp_path, monkeypatch, capsys):
    from sparsevlm.checkpoint import load_model_dir, save_model
    from sparsevlm.cli import main
    from sparsevlm.pruning import registry
    from sparsevlm.tree import flatten

    (tmp_path / "mean_input.py").write_text(METHOD_FILE)  # the one file
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry.METHODS, "mean-input", registry.Method("mean_input:prune_layer", needs_calibration=True))
    model = save_model(tmp_path / "model", tiny_bundle)
    out = tmp_path / "pruned"
    # The command line, calibration, reports and verify all take it from the registry.
    assert main(["prune", "--model", str(model), "--method", "mean-input", "--pattern", "2:4", "--vision-sparsity",
                 "0.5", "--language-sparsity", "0.5", "--calib-samples", "8", "--eval-images", "4",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "mean-input" and report["calibration"]["samples"] == 8
    assert report["measured"]["vision"] == 0.5 and report["measured"]["language"] == 0.5
    masks = {p: m for p, m in flatten(load_model_dir(out).masks).items() if m is not None}
    assert sorted(masks) == sorted(report["ratios"])
    assert main(["verify", "--model", str(out)]) == 0
    assert "verify: OK" in capsys.readouterr().out


def test_the_library_and_benchmarks_import_without_datasets():
    """The accelerator image has no `datasets`: only code that loads or builds a dataset may import it."""
    benchmarks = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py"))
    modules = ["sparsevlm", "sparsevlm.cli", "sparsevlm.train", "sparsevlm.restoration", "sparsevlm.pipeline",
               "sparsevlm.jobs", "sparsevlm.hf.load", "sparsevlm.lora", "sparsevlm.pretrain", "sparsevlm.eval.evaluate",
               *benchmarks]
    code = textwrap.dedent(f"""
        import contextlib, importlib, importlib.machinery, io, sys

        class WithoutDatasets(importlib.machinery.PathFinder):
            # As if not installed: `import datasets` fails and importlib.util.find_spec finds nothing.
            @classmethod
            def find_spec(cls, name, path=None, target=None):
                if name.partition(".")[0] == "datasets":
                    return None
                return super().find_spec(name, path, target)

        sys.meta_path[:] = [WithoutDatasets if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
        assert importlib.util.find_spec("datasets") is None
        sys.path.insert(0, {str(ROOT / "benchmarks")!r})  # the scripts import their siblings by bare name
        for name in {modules!r}:
            importlib.import_module(name)
        from sparsevlm.cli import main
        with contextlib.redirect_stdout(io.StringIO()) as out:
            try:
                main(["--help"])
            except SystemExit as exit:
                assert exit.code == 0, exit.code
        assert "usage" in out.getvalue() and "datasets" not in sys.modules
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
