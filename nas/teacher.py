"""Teachers for distillation: a reference architecture trained once per experiment, or a checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from search_spaces.architecture import Architecture
from search_spaces.errors import NasError
from search_spaces.space import SearchSpace


@dataclass(frozen=True)
class Teacher:
    arch: Architecture
    variables: Any
    test_accuracy: float
    source: str


def largest(space: SearchSpace) -> Architecture:
    """The architecture with the most parameters, by coordinate ascent over the decisions."""
    from evaluators.cost import analytic_cost

    choice = {d.name: 0 for d in space.decisions()}
    for _ in range(2):
        for d in space.decisions():
            best = max(range(len(d.options)),
                       key=lambda i: (analytic_cost(space.from_choices({**choice, d.name: i})).params, -i))
            choice[d.name] = best
    return space.from_choices(choice)


def load_checkpoint_folder(path: str | Path) -> tuple[Architecture, Any]:
    """(architecture, variables) from a folder holding architecture.json and variables.msgpack
    (a search checkpoint, a winners/NN folder, or an export folder with flax/)."""
    from evaluators.train import load_variables

    folder = Path(path)
    arch_file = folder / "architecture.json"
    var_file = next((p for p in (folder / "variables.msgpack", folder / "flax" / "variables.msgpack") if p.exists()), None)
    if not arch_file.exists() or var_file is None:
        raise NasError(f"{folder}: not a model checkpoint (needs architecture.json and variables.msgpack)")
    doc = json.loads(arch_file.read_text())
    arch = Architecture.from_dict(doc.get("architecture", doc))
    return arch, load_variables(var_file)


def resolve_teacher(spec: Mapping[str, Any], space: SearchSpace, data, train_cfg, cache_dir: Path,
                    printer=print) -> Teacher:
    """Build (or reuse from `cache_dir`) the teacher described by `spec`:
    {key: 'largest' | ARCH_KEY} trained on `data` with `train_cfg`, or {checkpoint: PATH}."""
    from evaluators.train import evaluate, load_variables, save_variables, train

    allowed = {"key", "checkpoint"}
    if set(spec) - allowed or len(spec) != 1:
        raise NasError(f"distill.teacher: give exactly one of {sorted(allowed)}, got {dict(spec)}")
    if "checkpoint" in spec:
        arch, variables = load_checkpoint_folder(spec["checkpoint"])
        expected = (data.resolution, data.channels, data.num_classes)
        if (arch.resolution, arch.in_channels, arch.num_classes) != expected:
            raise NasError(f"distill.teacher.checkpoint {spec['checkpoint']}: model takes "
                           f"{arch.resolution}x{arch.resolution}x{arch.in_channels} -> {arch.num_classes} classes, "
                           f"dataset gives {expected[0]}x{expected[0]}x{expected[1]} -> {expected[2]} classes")
        acc = evaluate(arch, variables, data.x_test, data.y_test)[0]
        return Teacher(arch, variables, acc, f"checkpoint {spec['checkpoint']}")
    key = spec["key"]
    arch = largest(space) if key == "largest" else space.decode(str(key))
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta = cache_dir / "teacher.json"
    if meta.exists() and json.loads(meta.read_text()).get("key") == arch.key:
        variables = load_variables(cache_dir / "variables.msgpack")
        acc = json.loads(meta.read_text())["test_accuracy"]
        return Teacher(arch, variables, acc, f"cached {cache_dir}")
    printer(f"training teacher {arch.key} ({'largest of the space' if key == 'largest' else 'from config'}) "
            f"for {train_cfg.epochs} epochs", flush=True)
    result = train(arch, data, train_cfg)
    acc = evaluate(arch, result.variables, data.x_test, data.y_test)[0]
    save_variables(cache_dir / "variables.msgpack", result.variables)
    (cache_dir / "architecture.json").write_text(arch.to_json(indent=2))
    meta.write_text(json.dumps({"key": arch.key, "test_accuracy": acc, "val_accuracy": result.val_accuracy}))
    return Teacher(arch, result.variables, acc, f"trained {arch.key}")


def cached_logits(teacher: Teacher, x: np.ndarray, path: Path) -> np.ndarray:
    """Teacher logits on `x`, computed once and kept at `path` (keyed by the teacher's key)."""
    from evaluators.train import predict_logits

    if path.exists():
        with np.load(path) as z:
            if str(z["key"]) == teacher.arch.key and z["logits"].shape[0] == len(x):
                return z["logits"]
    logits = np.asarray(predict_logits(teacher.arch, teacher.variables, x))
    np.savez(path, key=teacher.arch.key, logits=logits)
    return logits
