"""Teachers for distillation, and their outputs cached once per (teacher, dataset).

A teacher is one or more trained networks whose logits (averaged over members) and
penultimate features (concatenated over members) the students learn from. Four kinds, chosen
by the `distill.teacher` mapping of an experiment:

| spec | kind | what |
|---|---|---|
| `{key: largest}` / `{key: ARCH_KEY}` (+ `space: NAME_OR_YAML`) | `reference` | an architecture of the experiment's space (or of another space adapted to the dataset, e.g. a wider one), trained once per experiment and cached under `RUN_DIR/teacher/` |
| `{best: true}` | `best` | the search candidate with the highest validation accuracy |
| `{checkpoint: PATH}` | `checkpoint` | a folder with architecture.json and variables.msgpack |
| `{ensemble: K}` | `ensemble` | the K search candidates with the highest validation accuracy, logits averaged |
| `{key: ..., seeds: K}` | `ensemble` | the reference architecture trained K times (seeds 0..K-1), logits averaged |

Candidates are ranked by validation accuracy, never test accuracy; the test accuracy of the
teacher (of the averaged logits, for an ensemble) is only reported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from evaluators.augment import AugmentConfig
from evaluators.cost import analytic_cost
from evaluators.predict import evaluate, predict_features, predict_logits
from evaluators.train import train
from evaluators.variables import check_variables, load_variables, save_variables
from nas.config import TeacherConfig, build_section
from nas.rundir import ARCHITECTURE, VARIABLES, read_architecture, read_trials, read_winners, trial_checkpoints
from search_spaces.architecture import Architecture
from search_spaces.catalog import load_space
from search_spaces.errors import NasError
from search_spaces.space import SearchSpace

@dataclass(frozen=True, eq=False)
class Teacher:
    """A trained teacher: `members` are (architecture, variables) pairs (one unless an ensemble)."""

    kind: str  # reference | best | checkpoint | ensemble
    key: str
    members: tuple[tuple[Architecture, Any], ...]
    test_accuracy: float
    source: str
    val_accuracy: float | None = None

    @property
    def arch(self) -> Architecture:
        """The first (for an ensemble: the most accurate) member's architecture."""
        return self.members[0][0]

    @property
    def variables(self) -> Any:
        return self.members[0][1]

    @property
    def params(self) -> int:
        """Parameters of all members together."""

        return sum(int(analytic_cost(a).params) for a, _ in self.members)

    def outputs(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits averaged over members, penultimate features concatenated over members) for `x`."""

        outs = [predict_features(a, v, x) for a, v in self.members]
        return ensemble_logits([o[0] for o in outs]), np.concatenate([o[1] for o in outs], axis=1)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits for `x`, averaged over the members."""

        return ensemble_logits([predict_logits(a, v, x) for a, v in self.members])

    def fingerprint(self) -> str:
        """12 hex digits identifying the members' architectures and weights (the cache key)."""
        h = hashlib.sha1()
        for arch, variables in self.members:
            h.update(arch.to_json().encode())
            _hash_tree(h, variables)
        return h.hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        """What distill.json reports about the teacher."""
        return {"kind": self.kind, "key": self.key, "test_accuracy": self.test_accuracy,
                "val_accuracy": self.val_accuracy, "source": self.source, "params": self.params,
                "members": [a.key for a, _ in self.members]}


def ensemble_logits(logits: list[np.ndarray]) -> np.ndarray:
    """The members' logits averaged (an ensemble teacher's logits)."""
    if not logits:
        raise NasError("ensemble: no members")
    shapes = {np.shape(z) for z in logits}
    if len(shapes) != 1:
        raise NasError(f"ensemble: members' logits differ in shape: {sorted(shapes)}")
    return np.mean(np.stack([np.asarray(z, np.float32) for z in logits]), axis=0)


def _hash_tree(h: Any, tree: Any, prefix: str = "") -> None:
    if isinstance(tree, Mapping):
        for k in sorted(tree):
            _hash_tree(h, tree[k], f"{prefix}/{k}")
    else:
        a = np.ascontiguousarray(np.asarray(tree))
        h.update(f"{prefix}:{a.dtype}:{a.shape}".encode())
        h.update(a.tobytes())


def dataset_fingerprint(data) -> str:
    """12 hex digits identifying a dataset's training rows (name, images, labels)."""
    h = hashlib.sha1(data.name.encode())
    for a in (data.x_train, data.y_train):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:12]


def largest(space: SearchSpace) -> Architecture:
    """The architecture with the most parameters, by coordinate ascent over the decisions."""

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

    folder = Path(path)
    arch_file = folder / ARCHITECTURE
    var_file = next((p for p in (folder / VARIABLES, folder / "flax" / VARIABLES) if p.exists()), None)
    if not arch_file.exists() or var_file is None:
        raise NasError(f"{folder}: not a model checkpoint (needs {ARCHITECTURE} and {VARIABLES})")
    return read_architecture(arch_file), load_variables(var_file)


# ============================================================ search candidates
def search_candidates(run_dir: str | Path) -> list[dict[str, Any]]:
    """Trained candidates of a run that have weights, best validation accuracy first:
    [{'key', 'val_accuracy', 'folder'}]. Looks at the final trial checkpoints and at `winners/`."""
    run_dir = Path(run_dir)
    acc: dict[str, float] = {}
    for row in read_trials(run_dir, required=False):
        if row.get("status") == "ok" and row.get("key") and row.get("accuracy") not in (None, ""):
            acc[row["key"]] = max(acc.get(row["key"], -1.0), float(row["accuracy"]))
    folders: dict[str, Path] = {}
    for w in read_winners(run_dir):
        if w.checkpoint and (w.folder(run_dir) / VARIABLES).exists():
            folders[w.key] = w.folder(run_dir)
            acc.setdefault(w.key, w.val_accuracy)
    for folder in trial_checkpoints(run_dir):
        try:
            key = read_architecture(folder / ARCHITECTURE).key
        except NasError:
            continue
        folders.setdefault(key, folder)
    out = [{"key": k, "val_accuracy": acc[k], "folder": str(folders[k])} for k in folders if k in acc]
    out.sort(key=lambda c: (-c["val_accuracy"], c["key"]))
    return out


# ============================================================ resolving a teacher
def resolve_teacher(spec: TeacherConfig | Mapping[str, Any], space: SearchSpace, data, train_cfg, cache_dir: Path,
                    printer=print, *, candidates: list[dict[str, Any]] | None = None,
                    source: str = "distill.teacher", augment: AugmentConfig | None = None) -> Teacher:
    """Build (or reuse from `cache_dir`) the teacher described by `spec` (see the module docstring).

    Args:
      spec: the `distill.teacher` section (a mapping is validated as one).
      space: the experiment's space (for `{key: ...}` without `space`).
      data: the dataset; the teacher's input shape and class count must match it.
      train_cfg: how a reference teacher is trained (a `TrainConfig`).
      cache_dir: where a trained reference teacher is kept (one subfolder per architecture key).
      candidates: the search's trained candidates (`search_candidates(run_dir)`), for best/ensemble.
      augment: how a reference teacher's training batches are augmented (default: the dataset's own).
        Part of the cache key. Measured: trained with mixup, a teacher scored higher and taught worse
        (docs/distillation.md, "A stronger teacher"), so the distill stage does not use it.

    Raises:
      NasError: a bad spec, a checkpoint that does not fit the dataset or its own architecture,
        or fewer candidates than asked for; all before any training.
    """

    spec = build_section(TeacherConfig, spec, source).to_dict()
    if "checkpoint" in spec:
        path = spec["checkpoint"]
        arch, variables = _checked_member(path, data, f"{source}.checkpoint {path}")
        acc = evaluate(arch, variables, data.x_test, data.y_test)[0]
        val = evaluate(arch, variables, data.x_val, data.y_val)[0]
        return Teacher("checkpoint", arch.key, ((arch, variables),), acc, f"checkpoint {path}", val)
    if "best" in spec or "ensemble" in spec:
        k = 1 if "best" in spec else int(spec["ensemble"])
        what = f"{source}.best" if "best" in spec else f"{source}.ensemble"
        cands = list(candidates or [])
        if len(cands) < k:
            raise NasError(f"{what}: needs {k} trained search candidate(s) with weights; the run has {len(cands)}")
        members = tuple(_checked_member(c["folder"], data, f"{what} {c['folder']}") for c in cands[:k])
        if k == 1:
            arch, variables = members[0]
            acc = evaluate(arch, variables, data.x_test, data.y_test)[0]
            return Teacher("best", arch.key, members, acc, f"search candidate {cands[0]['folder']}",
                           cands[0]["val_accuracy"])
        return _ensemble(members, data, "+".join(a.key for a, _ in members),
                         f"ensemble of the top {k} search candidates")
    k = int(spec.get("seeds") or 1)
    members = [_reference(spec, space, data, dataclasses.replace(train_cfg, seed=train_cfg.seed + i),
                          Path(cache_dir) / (f"seed{i}" if i else ""), printer, source, augment) for i in range(k)]
    if k == 1:
        return members[0]
    # an ensemble of one network's independent trainings: a stronger teacher for K forwards a step
    # (docs/distillation.md, "A stronger teacher")
    printer(f"teacher {members[0].key}: {k} seeds, test accuracy "
            + ", ".join(f"{m.test_accuracy:.4f}" for m in members), flush=True)
    return _ensemble(tuple(m.members[0] for m in members), data, members[0].key,
                     f"{k} seeds of {members[0].key} ({members[0].source})")


def _ensemble(members: tuple[tuple[Architecture, Any], ...], data, key: str, source: str) -> Teacher:
    """An ensemble teacher of `members`, its test and validation accuracy those of the averaged logits."""
    def accuracy(x: np.ndarray, y: np.ndarray) -> float:
        logits = ensemble_logits([_logits(a, v, x) for a, v in members])
        return float((logits.argmax(axis=1) == np.asarray(y)).mean())

    return Teacher("ensemble", key, members, accuracy(data.x_test, data.y_test), source,
                   accuracy(data.x_val, data.y_val))


def _logits(arch: Architecture, variables: Any, x: np.ndarray) -> np.ndarray:
    return predict_logits(arch, variables, x)


def _checked_member(path: str | Path, data, what: str) -> tuple[Architecture, Any]:
    """Load a checkpoint folder and check it fits the dataset and its own architecture."""

    arch, variables = load_checkpoint_folder(path)
    expected = (data.resolution, data.channels, data.num_classes)
    if (arch.resolution, arch.in_channels, arch.num_classes) != expected:
        raise NasError(f"{what}: model takes {arch.resolution}x{arch.resolution}x{arch.in_channels} -> "
                       f"{arch.num_classes} classes, dataset '{data.name}' gives {expected[0]}x{expected[0]}x"
                       f"{expected[1]} -> {expected[2]} classes")
    return arch, check_variables(arch, variables, f"{what}: variables.msgpack")


def _reference(spec: Mapping[str, Any], space: SearchSpace, data, train_cfg, cache_dir: Path, printer,
               source: str, augment: AugmentConfig | None) -> Teacher:
    if "space" in spec:
        try:
            space = load_space(spec["space"]).with_input(resolution=data.resolution, in_channels=data.channels,
                                                         num_classes=data.num_classes)
        except NasError as e:
            raise NasError(f"{source}.space: {e}") from None
    key = spec["key"]
    try:
        arch = largest(space) if key == "largest" else space.decode(key)
    except NasError as e:
        raise NasError(f"{source}.key: {e}") from None
    folder = Path(cache_dir) / arch.key
    meta_file = folder / "teacher.json"
    want = {"key": arch.key, "space": space.name, "train": train_cfg.to_dict(), "dataset": dataset_fingerprint(data)}
    if augment is not None:
        want["augment"] = augment.to_dict()
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        if {k: meta.get(k) for k in want} == want and (folder / "variables.msgpack").exists():
            variables = load_variables(folder / "variables.msgpack")
            return Teacher("reference", arch.key, ((arch, variables),), meta["test_accuracy"],
                           f"cached {folder}", meta.get("val_accuracy"))
    printer(f"training teacher {arch.key} ({'largest of the space' if key == 'largest' else 'from config'}, "
            f"space {space.name}) for {train_cfg.epochs} epochs", flush=True)
    result = train(arch, data, train_cfg, augment=augment)
    acc = evaluate(arch, result.variables, data.x_test, data.y_test)[0]
    save_variables(folder / "variables.msgpack", result.variables)
    (folder / "architecture.json").write_text(arch.to_json(indent=2))
    meta_file.write_text(json.dumps({**want, "test_accuracy": acc, "val_accuracy": result.val_accuracy,
                                     "train_s": result.train_s}, indent=2))
    return Teacher("reference", arch.key, ((arch, result.variables),), acc, f"trained {arch.key}",
                   result.val_accuracy)


# ============================================================ cached outputs
def cached_outputs(teacher: Teacher, data, cache_dir: str | Path) -> tuple[np.ndarray, np.ndarray, Path, bool]:
    """The teacher's (logits, features) on `data.x_train`, computed once per (teacher, dataset) and kept
    in `cache_dir/outputs-<teacher>-<dataset>.npz`. Returns (logits, features, path, reused)."""
    path = Path(cache_dir) / f"outputs-{teacher.fingerprint()}-{dataset_fingerprint(data)}.npz"
    if path.exists():
        try:
            with np.load(path) as z:
                logits, feats = z["logits"], z["features"]
            if logits.shape == (len(data.x_train), data.num_classes) and len(feats) == len(logits):
                return logits, feats, path, True
        except (OSError, ValueError, KeyError):
            pass  # unreadable: recompute
    logits, feats = teacher.outputs(data.x_train)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as f:
        np.savez(f, key=teacher.key, logits=logits, features=feats)
    tmp.replace(path)
    return logits, feats, path, False
