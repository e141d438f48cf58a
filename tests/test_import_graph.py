"""The import rule (README "Layout"): every stage imports only from the stages below it, and
no module of `llada_jax` or `data_pipeline` takes part in an import cycle.

Read from the source with `ast`, every import counted (also those inside functions, which run
later but tie the modules together all the same). Stages, from the bottom:
  1   data_pipeline
  1.5 llada_jax's base modules (errors, sharding, runtime, metrics_writer, platforms,
      workdir_lock, tokenizer_checks, drafter_contract)
  2   model, then checkpoints (2.5: it loads models)
  3   distill, decode
  4   train, eval, speculate, teacher
  4.5 configs (the shipped configs, on top of train), onpolicy (rounds: train + speculate)
  5   commands, the package's lazy facade (llada_jax/__init__.py); then cli.py, __main__.py
Inside one package (e.g. distill -> distill) imports are free, as long as they make no cycle.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
STAGES = {
    "data_pipeline": 1.0,
    "llada_jax.errors": 1.5, "llada_jax.sharding": 1.5, "llada_jax.runtime": 1.5,
    "llada_jax.metrics_writer": 1.5, "llada_jax.platforms": 1.5, "llada_jax.workdir_lock": 1.5,
    "llada_jax.tokenizer_checks": 1.5, "llada_jax.drafter_contract": 1.5,
    "llada_jax.reports": 1.5,
    "llada_jax.model": 2.0, "llada_jax.checkpoints": 2.5,
    "llada_jax.distill": 3.0, "llada_jax.decode": 3.0,
    "llada_jax.train": 4.0, "llada_jax.eval": 4.0, "llada_jax.speculate": 4.0,
    "llada_jax.teacher": 4.0, "llada_jax.configs": 4.5, "llada_jax.onpolicy": 4.5,
    "llada_jax.commands": 5.0, "llada_jax.cli": 5.5, "llada_jax.__main__": 6.0,
    "llada_jax": 5.0,
}
BASE = ("llada_jax.errors", "llada_jax.sharding", "llada_jax.runtime", "llada_jax.metrics_writer",
        "llada_jax.platforms", "llada_jax.workdir_lock", "llada_jax.tokenizer_checks",
        "llada_jax.drafter_contract", "llada_jax.reports")


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for package in ("llada_jax", "data_pipeline"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if "hf_remote" in path.parts:  # PyTorch remote code for HF, shipped as files
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The project modules `name` imports (`from a.b import c` counts a.b.c when it is a
    module, else a.b)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
    return {m for m in found if m in known and m != name}


def stage(module: str) -> tuple[float, str]:
    """(stage number, the unit inside which imports are free)."""
    for prefix in sorted(STAGES, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            unit = "base" if prefix in BASE else prefix
            return STAGES[prefix], unit
    raise AssertionError(f"{module} has no stage: add it to STAGES (and to the README layout)")


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_every_import_points_down_the_stages():
    backward = []
    for module, targets in graph().items():
        (level, unit) = stage(module)
        for target in sorted(targets):
            t_level, t_unit = stage(target)
            if t_unit != unit and t_level >= level:
                backward.append(f"{module} (stage {level}) imports {target} (stage {t_level})")
    assert not backward, "imports that do not point down:\n  " + "\n  ".join(backward)


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [node, target])
                              if target in path else f"{node} -> {target}")
            elif target not in state:
                visit(target, path + [node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_the_rule_is_checked_on_a_graph_that_has_the_edges():
    """The parser sees real edges (a broken one would pass the two tests above vacuously)."""
    edges = graph()
    assert "llada_jax.model.modeling" in edges["llada_jax.checkpoints"]
    assert "llada_jax.distill.loss" in edges["llada_jax.train.train_step"]
    assert "llada_jax.commands.train" in edges["llada_jax.commands.generate_teacher"]
    assert len(edges) > 60
