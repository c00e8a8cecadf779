"""Experiment configs: YAML -> validated, frozen plain data, once, at the edge.

Every section is a small frozen dataclass; an unknown key or a bad value is a one-line
`NasError` naming the file, the dotted key and what is allowed. `--set a.b=value` overrides
are applied to the raw document before validation, so they are validated the same way.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from search_spaces.catalog import read_yaml
from search_spaces.errors import NasError


@dataclass(frozen=True)
class DatasetConfig:
    name: str = "digits"
    path: str | None = None
    val_fraction: float = 0.15
    test_fraction: float = 0.15


@dataclass(frozen=True)
class SearchConfig:
    algorithm: str = "random"
    options: Mapping[str, Any] = field(default_factory=dict)
    scheduler: str | None = None  # None or "asha"
    scheduler_options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ObjectiveConfig:
    metric: str = "accuracy"
    cost: str | None = "params"  # params | macs | latency_ms@PROFILE | ... ; None = accuracy only
    target: float | None = None
    alpha: float = -0.07
    beta: float = -0.07
    constraints: Mapping[str, float] = field(default_factory=dict)  # cost name -> max value
    profiles: tuple[str, ...] = ()  # hardware profiles whose predicted latency every trial records


@dataclass(frozen=True)
class EvaluatorConfig:
    """How a candidate is evaluated: trained on the dataset, looked up in a benchmark table, or scored
    on a trained supernet (inherited accuracy, `batch` candidates per call; nas.batched_search)."""

    kind: str = "train"  # train | table | supernet
    table: str | None = None  # a NAS-Bench-Macro-format JSON (kind: table)
    run: str | None = None  # a run directory holding a trained supernet (kind: supernet)
    batch: int = 64  # candidates scored per call (kind: supernet)
    metric: str = "mean_acc"
    sample_repeat: bool = False


@dataclass(frozen=True)
class Resources:
    cpu: float = 1
    gpu: float = 0
    memory_gb: float | None = None


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    space: str
    dataset: DatasetConfig = DatasetConfig()
    space_input: Mapping[str, int] = field(default_factory=dict)  # resolution / in_channels / num_classes override
    seed: int = 0
    num_trials: int = 12
    max_concurrent: int = 2
    output_dir: str = "runs"
    storage_path: str | None = None  # Ray Tune storage (shared dir or cloud URI); default RUN_DIR
    max_failures: int = 0  # retries of a trial whose worker died or raised (node loss)
    top_k: int = 3
    train: Mapping[str, Any] = field(default_factory=dict)  # validated by evaluators.train.TrainConfig
    search: SearchConfig = SearchConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    evaluator: EvaluatorConfig = EvaluatorConfig()
    distill: Mapping[str, Any] = field(default_factory=dict)  # validated by nas.distill.DistillConfig
    export: Mapping[str, Any] = field(default_factory=dict)  # validated by nas.export.ExportConfig
    supernet: Mapping[str, Any] = field(default_factory=dict)  # validated by evaluators.supernet.SupernetConfig
    resources: Resources = Resources()
    source: str = "<dict>"

    @property
    def run_dir(self) -> Path:
        return (Path(self.output_dir) / self.name).resolve()

    def to_dict(self) -> dict[str, Any]:
        d = _plain(dataclasses.asdict(self))
        d.pop("source")
        if not d["supernet"]:
            d.pop("supernet")  # runs saved before the section existed compare equal
        return d


_SECTIONS = {
    "dataset": DatasetConfig, "search": SearchConfig, "objective": ObjectiveConfig, "resources": Resources,
    "evaluator": EvaluatorConfig,
}


def _plain(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _err(src: str, key: str, msg: str) -> NasError:
    return NasError(f"{src}: {key}: {msg}")


def _build(cls, raw: Any, src: str, prefix: str):
    if not isinstance(raw, Mapping):
        raise _err(src, prefix, f"expected a mapping, got {type(raw).__name__}")
    allowed = {f.name for f in fields(cls)} - {"source"}
    kwargs = {}
    for k, v in raw.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in allowed:
            raise _err(src, key, f"unknown key; allowed: {', '.join(sorted(allowed))}")
        if k == "dataset" and isinstance(v, str) and cls is ExperimentConfig:
            v = DatasetConfig(name=v)  # shorthand: `dataset: digits`
        elif k in _SECTIONS and cls is ExperimentConfig:
            v = _build(_SECTIONS[k], v if v is not None else {}, src, key)
        kwargs[k] = _coerce(cls, k, v, src, key)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise _err(src, prefix or "(top level)", f"missing required key ({e})") from None


_NUM = (int, float)


def _coerce(cls, name: str, v: Any, src: str, key: str) -> Any:
    """Type-check one field against its dataclass default's type."""
    f = {f.name: f for f in fields(cls)}[name]
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    if dataclasses.is_dataclass(v) or v is None and (default is None or "None" in str(f.type)):
        return v  # a section already built, or null for an optional field
    if isinstance(default, bool):
        if not isinstance(v, bool):
            raise _err(src, key, f"expected true or false, got {v!r}")
    elif isinstance(default, int) and not isinstance(default, bool):
        if isinstance(v, bool) or not isinstance(v, int):
            raise _err(src, key, f"expected an integer, got {v!r}")
    elif isinstance(default, float):
        if isinstance(v, bool) or not isinstance(v, _NUM):
            raise _err(src, key, f"expected a number, got {v!r}")
        v = float(v)
    elif isinstance(default, str):
        if not isinstance(v, str):
            raise _err(src, key, f"expected a string, got {v!r}")
    elif isinstance(default, tuple):
        if isinstance(v, str):
            v = [s.strip() for s in v.split(",") if s.strip()]
        if not isinstance(v, (list, tuple)):
            raise _err(src, key, f"expected a list, got {v!r}")
        v = tuple(v)
    elif isinstance(default, Mapping) and v is not None and not isinstance(v, Mapping):
        raise _err(src, key, f"expected a mapping, got {v!r}")
    return v


def _validate(cfg: ExperimentConfig) -> ExperimentConfig:
    src = cfg.source
    if not cfg.name or "/" in cfg.name:
        raise _err(src, "name", f"invalid experiment name {cfg.name!r}; allowed a non-empty name without '/'")
    if cfg.max_failures < 0:
        raise _err(src, "max_failures", f"must be >= 0, got {cfg.max_failures}")
    for k in ("num_trials", "max_concurrent", "top_k"):
        if getattr(cfg, k) < 1:
            raise _err(src, k, f"must be >= 1, got {getattr(cfg, k)}")
    if cfg.top_k > cfg.num_trials:
        raise _err(src, "top_k", f"{cfg.top_k} exceeds num_trials ({cfg.num_trials})")
    bad_input = set(cfg.space_input) - {"resolution", "in_channels", "num_classes"}
    if bad_input:
        raise _err(src, f"space_input.{sorted(bad_input)[0]}", "unknown key; allowed: in_channels, num_classes, resolution")
    if cfg.search.scheduler not in (None, "asha"):
        raise _err(src, "search.scheduler", f"unknown scheduler {cfg.search.scheduler!r}; allowed: asha (or null)")
    if cfg.evaluator.kind not in ("train", "table", "supernet"):
        raise _err(src, "evaluator.kind", f"unknown evaluator {cfg.evaluator.kind!r}; allowed: train, table, supernet")
    if cfg.evaluator.kind == "supernet" and not cfg.evaluator.run:
        raise _err(src, "evaluator.run", "required with evaluator.kind = supernet (a run directory with a trained "
                                         "supernet, from `nas supernet train`)")
    if cfg.evaluator.batch < 1:
        raise _err(src, "evaluator.batch", f"must be >= 1, got {cfg.evaluator.batch}")
    if cfg.evaluator.kind == "table" and not cfg.evaluator.table:
        raise _err(src, "evaluator.table", "required with evaluator.kind = table (a benchmark table JSON file)")
    o = cfg.objective
    if o.metric != "accuracy":
        raise _err(src, "objective.metric", f"unknown metric {o.metric!r}; allowed: accuracy")
    if o.cost is not None and o.target is not None and o.target <= 0:
        raise _err(src, "objective.target", f"must be > 0, got {o.target}")
    if o.cost is not None and o.target is None:
        raise _err(src, "objective.target", f"required with objective.cost = {o.cost!r} (the cost the penalty aims at)")
    for k, v in o.constraints.items():
        if isinstance(v, bool) or not isinstance(v, _NUM) or v <= 0:
            raise _err(src, f"objective.constraints.{k}", f"must be a positive number, got {v!r}")
    return cfg


def apply_overrides(doc: dict[str, Any], overrides: list[str], src: str) -> dict[str, Any]:
    """Apply `key.sub=value` strings (values parsed as YAML scalars/lists) to a raw config dict."""
    doc = copy.deepcopy(doc)
    for item in overrides:
        if "=" not in item:
            raise NasError(f"--set {item!r}: expected key=value (dotted keys for nested values)")
        path, _, text = item.partition("=")
        value = _parse_value(text)
        node = doc
        parts = path.strip().split(".")
        for p in parts[:-1]:
            if isinstance(node.get(p), str) and p == "dataset":
                node[p] = {"name": node[p]}
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise NasError(f"--set {item!r}: '{p}' is not a section")
        node[parts[-1]] = value
    return doc


def _parse_value(text: str) -> Any:
    """A --set value as YAML, with numbers like 5e4 (which YAML 1.1 reads as strings) as floats."""
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override and validate an experiment config file."""
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise NasError(f"{path}: expected a mapping of config keys")
    return config_from_dict(apply_overrides(raw, overrides or [], str(path)), source=str(path))


def config_from_dict(raw: Mapping[str, Any], source: str = "<dict>") -> ExperimentConfig:
    cfg = _build(ExperimentConfig, raw, source, "")
    return _validate(dataclasses.replace(cfg, source=source))
