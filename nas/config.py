"""Experiment configs: YAML -> validated, typed, frozen plain data, once, at the edge.

Every section is a small frozen dataclass whose fields declare what they accept; one builder
(`search_spaces.schema.build`) checks them all, so an unknown key or a bad value is a one-line
`NasError` naming the file, the dotted key and what is allowed. `--set a.b=value` overrides are
applied to the raw document before validation, so they are validated the same way. The defaults
live here, in the field declarations, and nowhere else.

Paths: every path of an experiment (`dataset.path`, `output_dir`, `storage_path` unless a URI,
`distill.teacher.checkpoint`, `evaluator.run`) is resolved once, when the config is loaded, relative to the
current working directory, and stored absolute: Ray trials run in their own working directory,
and a run directory's config.yaml then names the files it used. Whether those files exist is
checked by `nas.preflight.preflight`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from evaluators.augment import AugmentConfig
from evaluators.lowrank import LowRankTarget
from evaluators.data.spec import DataSpec
from evaluators.hardware import PROFILES
from evaluators.optim import KDConfig, TrainConfig
from evaluators.prune import CRITERIA as PRUNE_CRITERIA
from evaluators.prune import Target
from evaluators.quantize import CALIBRATION_METHODS, WEIGHT_RANGE_CHOICES
from evaluators.supernet import SupernetConfig
from evaluators.table import resolve_table
from nas.objective import LATENCY_PREFIX, check_cost_name, latency_profile, own_latency
from search_spaces.catalog import read_yaml
from search_spaces.errors import NasError
from search_spaces.schema import Errors, build, number, spec, to_plain


def absolute(path: str | None) -> str | None:
    """`path` made absolute against the current working directory (a URI such as s3://... unchanged)."""
    if path is None or "://" in path:
        return path
    return str(Path(path).expanduser().absolute())


# The `dataset:` section is validated by the data floor's own spec (sources, paths, splits, augment,
# streaming; relative path/root/data_dir made absolute against the working directory when loaded).
DatasetConfig = DataSpec


@dataclass(frozen=True)
class SearchConfig:
    algorithm: str = "random"  # a strategy of nas.strategies or tpe / nsga2 (checked by nas.preflight)
    options: Mapping[str, Any] = spec(factory=dict)
    scheduler: str | None = spec(None, choices=("asha",), what="scheduler")  # None or "asha"
    scheduler_options: Mapping[str, Any] = spec(factory=dict)


def _positive_numbers(values: Mapping[str, Any]) -> str | None:
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            return f"{k}: must be a positive number, got {v!r}"
    return None


@dataclass(frozen=True)
class ObjectiveConfig:
    metric: str = spec("accuracy", choices=("accuracy",), what="metric")
    cost: str | None = "params"  # params | macs | latency_ms@PROFILE | ... ; None = accuracy only
    target: float | None = None
    alpha: float = -0.07
    beta: float = -0.07
    constraints: Mapping[str, float] = spec(factory=dict, check=_positive_numbers)  # cost name -> max value
    profiles: tuple[str, ...] = ()  # hardware profiles whose predicted latency every trial records

    def check(self, err: Errors) -> None:
        if self.cost is not None and self.target is None:
            raise err("target", f"required with objective.cost = {self.cost!r} (the cost the penalty aims at)")
        if self.cost is not None and self.target <= 0:
            raise err("target", f"must be > 0, got {self.target}")


@dataclass(frozen=True)
class EvaluatorConfig:
    """How a candidate is evaluated: trained on the dataset, looked up in a benchmark table, or scored
    on a trained supernet (inherited accuracy, `batch` candidates per call; nas.batched_search), in this
    process or fanned out over `workers` Ray actors that each hold the supernet once (nas.tune.scoring)."""

    kind: str = spec("train", choices=("train", "table", "supernet"), what="evaluator")
    table: str | None = None  # a NAS-Bench-Macro-format JSON (kind: table)
    run: str | None = spec(None, check=lambda v: None if v else "empty; allowed a run directory with a trained "
                           "supernet (from `nas supernet train`)")  # kind: supernet; absolute once loaded
    batch: int = spec(64, ge=1)  # candidates scored per call (kind: supernet)
    workers: int = spec(0, ge=0)  # kind supernet: Ray actors sharing each call's scoring (0: in this process)
    metric: str = "mean_acc"
    sample_repeat: bool = False

    def check(self, err: Errors) -> None:
        if self.kind == "table" and not self.table:
            raise err("table", "required with evaluator.kind = table (a benchmark table JSON file)")
        if self.kind == "supernet" and not self.run:
            raise err("run", "required with evaluator.kind = supernet (a run directory with a trained supernet, "
                             "from `nas supernet train`)")


@dataclass(frozen=True)
class Resources:
    cpu: float = 1
    gpu: float = 0
    memory_gb: float | None = None


TEACHER_KINDS = {"key": "reference", "best": "best", "checkpoint": "checkpoint", "ensemble": "ensemble"}


@dataclass(frozen=True)
class TeacherConfig:
    """`distill.teacher`: exactly one of key (+ space, seeds), best, checkpoint, ensemble (see nas.teacher)."""

    key: str | None = spec(None, check=lambda v: None if v else "empty; allowed 'largest' or an architecture key")
    space: str | None = spec(None, check=lambda v: None if v else "empty; allowed a registered space name or a YAML file")
    best: bool | None = spec(None, check=lambda v: None if v else "false; allowed true (the most accurate candidate)")
    checkpoint: str | None = spec(None, check=lambda v: None if v else "empty; allowed a folder with "
                                  "architecture.json and variables.msgpack")
    ensemble: int | None = spec(None, ge=2)  # the top-K search candidates
    seeds: int | None = spec(None, ge=1)  # key only: K trainings of it (seeds 0..K-1), logits averaged

    @property
    def kind(self) -> str:
        """reference | best | checkpoint | ensemble."""
        return next(TEACHER_KINDS[k] for k in TEACHER_KINDS if getattr(self, k) is not None)

    def check(self, err: Errors) -> None:
        given = [k for k in TEACHER_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise err("", f"give exactly one of key, best, checkpoint, ensemble; got {given or 'none'}")
        if self.space is not None and self.key is None:
            raise err("space", "only allowed with key (a reference architecture of another space)")
        if self.seeds is not None and self.key is None:
            raise err("seeds", "only allowed with key (an ensemble of seeds of a reference architecture)")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in to_plain(self).items() if v is not None}


TEACHER_OUTPUTS = ("online", "cached")  # distill.teacher_outputs: the teacher inside the step | stored once


@dataclass(frozen=True)
class DistillConfig:
    """The `distill:` section: fine-tune each winner with KD against a same-budget baseline (nas.distill).

    teacher_outputs: online runs the teacher inside each step on exactly the student's augmented view
    (consistent teaching); cached stores its logits (and features) once on the un-augmented rows.
    augment: the augmentation both arms train with (the same views for baseline and KD).
    steps: the budget in optimizer steps instead of `epochs` (rounded up to whole epochs).
    resume: keep each student's training state per epoch; a re-run continues after a kill.
    warmup_epochs: None gives 1 epoch of warm-up when epochs >= 3 (and the schedule allows it), else 0.
    """

    enabled: bool = True
    teacher: TeacherConfig = spec(factory=lambda: TeacherConfig(key="largest"))
    temperature: float = spec(KDConfig.temperature, gt=0)  # chosen on the validation split: benchmarks/distill_sweep.py
    alpha: float = spec(KDConfig.alpha, ge=0, le=1)
    beta: float = spec(KDConfig.beta, ge=0)  # weight of the hint loss on penultimate features (0: response-based KD)
    epochs: int = spec(12, ge=1)  # chosen on the validation split: benchmarks/distill_sweep.py (docs/distillation.md)
    learning_rate: float = spec(1e-3, gt=0)
    schedule: str | None = None  # None: cosine, or warmup_cosine when warmup_epochs > 0
    warmup_epochs: float | None = spec(None, ge=0)
    init: str = spec("search", choices=("search", "scratch"))  # search checkpoint | fresh weights
    seeds: int = spec(1, ge=1)
    teacher_epochs: int | None = spec(None, ge=1)  # None: the search's train.epochs
    # -- consistent, patient teaching (issue #26): see docs/distillation.md
    teacher_outputs: str = spec("online", choices=TEACHER_OUTPUTS)
    augment: AugmentConfig = spec(factory=lambda: AugmentConfig(mixup=1.0))
    steps: int | None = spec(None, ge=1)
    resume: bool = True

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, source: str = "distill") -> "DistillConfig":
        """Validate a mapping; `source` is 'FILE: KEY' or 'KEY' (errors name `{source}.{key}`)."""
        return build_section(cls, d, source)

    def check(self, err: Errors) -> None:
        if self.beta and self.teacher_outputs != "cached":
            raise err("beta", f"{self.beta}; the hint loss needs teacher_outputs: cached "
                              f"(an online teacher gives logits only)")
        # epochs / learning_rate / schedule / warmup_epochs must make a valid training schedule together
        TrainConfig.from_dict(self._schedule(), f"{err.source}: {err.prefix}" if err.source else err.prefix)

    def _schedule(self, epochs: int | None = None) -> dict[str, Any]:
        epochs = epochs or self.epochs
        warmup = self.warmup_epochs
        if warmup is None:
            warmup = 1 if epochs >= 3 and self.schedule in (None, "warmup_cosine") else 0
        schedule = self.schedule or ("warmup_cosine" if warmup else "cosine")
        return {"epochs": epochs, "learning_rate": self.learning_rate, "schedule": schedule, "warmup_epochs": warmup}

    def student_train(self, base: TrainConfig, n_train: int | None = None) -> TrainConfig:
        """The students' `TrainConfig`: the search's `base` with this stage's schedule; with `steps`, as
        many whole epochs of `n_train` rows as cover them."""
        sched = self._schedule()
        if self.steps is not None and n_train is not None:
            sched = self._schedule(max(1, math.ceil(self.steps / max(1, n_train // base.batch_size))))
            TrainConfig.from_dict(sched, "distill (epochs from steps)")
        return dataclasses.replace(base, **sched)

    def augment_config(self) -> AugmentConfig:
        """The `AugmentConfig` both arms train with (the same views for baseline and KD)."""
        return self.augment

    def kd(self) -> KDConfig:
        """The `KDConfig` of the KD students."""
        return KDConfig(temperature=self.temperature, alpha=self.alpha, beta=self.beta)


EXPORT_FORMATS = ("flax", "onnx", "stablehlo")  # what `export.formats` / `nas export --format` accept


@dataclass(frozen=True)
class ExportConfig:
    """The `export:` section of an experiment config (and the defaults of `nas export`).

    formats: any of flax, onnx, stablehlo. int8: also write model.int8.onnx (needs onnx).
    calibration_images: training images that calibrate the int8 activation ranges.
    calibration_method: how ranges are set from them: percentile (default), minmax, entropy.
    int8_float_se: keep squeeze-and-excite paths in float in model.int8.onnx (fewer Q/DQ nodes: faster
      at batch 1 in ONNX Runtime; fp32 SE weights: a bigger file; docs/compress.md).
    int8_weight_range: int8 weights in [-127, 127] (full, the default) or [-64, 64] (reduced: what ONNX
      Runtime computes exactly on x86-64 CPUs without VNNI); auto: the one this machine's CPU needs.
      Post-training, full is the default because 7-bit weights lose what saturation costs: on three
      mnist5k winners (AVX2, no VNNI) full lost 0.27 / 0.13 / -0.53 points, reduced 0.53 / 0.13 / 0.00
      (docs/compress.md). Quantization-aware training trains on the 7-bit grid instead (compress:).
    tolerance: max abs logit difference allowed between a runtime and JAX.
    int8_max_drop: largest test-accuracy loss (fraction, 0.01 = 1 point) int8 may have vs fp32.
    latency_budget_s: time spent per latency measurement (0: do not measure).
    """

    enabled: bool = True
    formats: tuple[str, ...] = spec(("flax",), choices=EXPORT_FORMATS, what="format",
                                    check=lambda v: None if v else f"empty; allowed: {', '.join(EXPORT_FORMATS)}")
    int8: bool = False
    calibration_images: int = spec(256, ge=1)
    calibration_method: str = spec("percentile", choices=CALIBRATION_METHODS, what="method")
    int8_float_se: bool = False
    int8_weight_range: str = spec("full", choices=WEIGHT_RANGE_CHOICES, what="weight range")
    tolerance: float = spec(1e-4, ge=0)
    int8_max_drop: float = spec(0.01, ge=0)
    latency_budget_s: float = spec(0.3, ge=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", tuple(dict.fromkeys(self.formats)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, source: str = "export") -> "ExportConfig":
        """Validate a mapping; `source` is 'FILE: KEY' or 'KEY' (errors name `{source}.{key}`)."""
        return build_section(cls, d, source)

    def check(self, err: Errors) -> None:
        if self.int8 and "onnx" not in self.formats:
            raise err("int8", f"needs 'onnx' in {err.key('formats')} (int8 is quantized from model.onnx)")

    def run_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `export_run` this section stands for."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "enabled"}


@dataclass(frozen=True)
class CompressConfig:
    """The `compress:` section of an experiment (and the options of `nas compress`, nas.compress)."""

    enabled: bool = False
    prune: str | None = None  # macs=F | params=F | latency_ms@PROFILE=MS (checked by evaluators.prune.Target)
    criterion: str = spec("l1", choices=PRUNE_CRITERIA, what="criterion")
    min_keep: float = spec(0.25, ge=0, check=lambda v: None if v < 1 else f"{v!r}; allowed a fraction in [0, 1)")
    divisor: int = spec(16, ge=1)  # kept widths and low-rank ranks are multiples of this (ONNX Runtime's blocked NCHWc kernels; 1: any)
    cost_aware: bool = False  # rank channels by importance per unit of the target's cost (else importance only)
    steps: int = spec(1, ge=1)  # AGP steps (1: one-shot); each step is followed by epochs / steps of fine-tuning
    epochs: int = spec(3, ge=0)
    # peak rate of each fine-tuning (cosine to 0); null: the run's train.learning_rate, i.e. learning-rate
    # rewinding (Renda et al., ICLR 2020): on the three mnist5k winners of benchmarks/compress.py, +0.40 / -0.13 /
    # +1.87 points against fine-tuning at 0.002 (pruned - uniform -0.40/-0.67/-0.93 -> 0.00/-0.80/+0.93; docs/compress.md)
    learning_rate: float | None = spec(None, gt=0)
    kd: bool = True  # fine-tune with distillation from the run's teacher (else cross-entropy)
    # low-rank factorization after pruning (evaluators.lowrank): false, true (= energy=0.9), 'energy=F',
    # 'params=F' or 'macs=F'; checked by evaluators.lowrank.LowRankTarget in `check`
    lowrank: Any = False
    lowrank_epochs: int = spec(2, ge=0)  # fine-tuning epochs after the factorization
    # which factorized layers stay: 'latency' - only those whose one-layer ONNX Runtime model is faster
    # factorized at batch 1 and 32 (measured; needs latency_budget_s > 0); 'cost' - every one that has
    # fewer parameters than the whole layer (always required)
    lowrank_keep: str = spec("latency", choices=("latency", "cost"), what="lowrank_keep")
    qat: bool = False  # quantization-aware training after pruning: adds model.int8.onnx (evaluators.qat)
    qat_epochs: int = spec(2, ge=1)
    qat_learning_rate: float = spec(2e-4, gt=0)
    calibration_images: int = spec(256, ge=1)  # activation ranges of the int8 export
    # with qat: squeeze-and-excite paths left in float in model.int8.onnx (as export.int8_float_se: fewer
    # Q/DQ nodes, faster at batch 1 on ONNX Runtime, a bigger file)
    int8_float_se: bool = False
    # with qat: the int8 weights' range, trained and shipped: full [-127, 127], reduced [-64, 64] (exact
    # on x86-64 CPUs without VNNI, where ONNX Runtime's u8 x s8 kernels saturate), auto: the one this
    # machine's CPU needs (evaluators.quantize.weight_range_for_cpu)
    int8_weight_range: str = spec("auto", choices=WEIGHT_RANGE_CHOICES, what="weight range")
    latency_budget_s: float = spec(0.3, ge=0)  # per measured figure (0: do not measure)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, source: str = "compress") -> "CompressConfig":
        """Validate a mapping; `source` is 'FILE: KEY' or 'KEY' (errors name `{source}.{key}`)."""
        return build_section(cls, d, source)

    def check(self, err: Errors) -> None:
        if self.prune is None and not self.qat and not self.lowrank:
            raise err("prune", "no technique chosen; give a target: macs=F, params=F or latency_ms@PROFILE=MS, "
                      "and/or lowrank: true|energy=F|params=F|macs=F, and/or qat: true")
        if self.int8_float_se and not self.qat:
            raise err("int8_float_se", "true shapes the int8 model that qat writes; set qat: true as well")
        if self.int8_weight_range != "auto" and not self.qat:
            raise err("int8_weight_range", f"{self.int8_weight_range} shapes the int8 model that qat writes; "
                      "set qat: true as well")
        if self.prune is not None:
            Target.parse(self.prune, f"{err.source}: {err.key('prune')}" if err.source else err.key("prune"))
        if self.lowrank is not False and self.lowrank is not None:
            LowRankTarget.parse(self.lowrank, f"{err.source}: {err.key('lowrank')}" if err.source else err.key("lowrank"))

    def target(self) -> Target | None:
        return Target.parse(self.prune) if self.prune is not None else None

    def lowrank_target(self) -> LowRankTarget | None:
        off = self.lowrank is False or self.lowrank is None
        return None if off else LowRankTarget.parse(self.lowrank, "compress.lowrank")

    def tag(self) -> str:
        """Folder-name suffix, e.g. 'prune-macs50-l1-lowrank-energy90-qat' (letters, digits and '-' only)."""
        parts = []
        t = self.target()
        if t is not None:
            v = f"{round(100 * t.value)}" if t.kind != "latency_ms" else f"{t.value:g}".replace(".", "p")
            parts.append(f"prune-{t.kind.replace('_', '')}{t.profile}{v}-{self.criterion}")
        lr = self.lowrank_target()
        if lr is not None:
            parts.append(f"lowrank-{lr.kind}{round(100 * lr.value)}")
        if self.qat:
            parts.append("qat")
        return "-".join(parts)


def _targets_check(targets: Mapping[str, Any]) -> str | None:
    """What is wrong with `specialize.targets` ({PROFILE: {COST: MAX}}), or None."""
    for prof, limits in targets.items():
        if prof not in PROFILES.names():
            return f"unknown hardware profile {prof!r}; allowed: {', '.join(PROFILES.names())}"
        if not isinstance(limits, Mapping):
            return f"{prof}: expected a mapping of COST: MAX, e.g. {{latency_ms: 3.0}}, got {limits!r}"
        for cost, v in limits.items():
            name = own_latency(str(cost), prof) or str(cost)
            try:
                check_cost_name(name, "")
                other = latency_profile(name)
            except NasError as e:
                return f"{prof}.{cost}: {str(e).removeprefix(': ')}"
            if other is not None and other != prof:
                return (f"{prof}.{cost}: another profile's latency; allowed latency_ms[:int8] "
                        f"(or {LATENCY_PREFIX}{prof}[:int8])")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                return f"{prof}.{cost}: must be a positive number, got {v!r}"
    return None


@dataclass(frozen=True)
class SpecializeConfig:
    """The `specialize:` section: which devices a trained supernet is specialized for, and the effort
    per device (nas.specialize). `nas supernet train` specializes for `targets` right after training;
    `nas specialize RUN_DIR` uses them when no --profile is given.

    targets: {PROFILE: {COST: MAX}}: a hardware profile and the hard constraints its winner meets;
      `latency_ms` is the profile's own predicted latency (`latency_ms:int8`: of its int8 model, from
      the profile's measured int8 table), any other cost name (params, macs, ...) as in
      `objective.constraints`. Empty: no specialization unless asked on the command line.
    budget: candidates proposed per profile (accuracy predicted); population, sample, mutations: the
      aging evolution's; batch: candidates predicted per call.
    confirm: the best predicted candidates measured on the supernet; top_k: winners kept of those.
    measure: random candidates measured once per run to fit the accuracy predictor.
    """

    targets: Mapping[str, Mapping[str, float]] = spec(factory=dict, check=_targets_check)
    budget: int = spec(1000, ge=1)
    batch: int = spec(100, ge=1)
    population: int = spec(50, ge=1)
    sample: int = spec(10, ge=1)
    mutations: int = spec(1, ge=1)
    confirm: int = spec(12, ge=1)
    top_k: int = spec(3, ge=1)
    measure: int = spec(300, ge=10)
    seed: int = spec(0, ge=0)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, source: str = "specialize") -> "SpecializeConfig":
        """Validate a mapping; `source` is 'FILE: KEY' or 'KEY' (errors name `{source}.{key}`)."""
        return build_section(cls, d, source)

    def check(self, err: Errors) -> None:
        if self.top_k > self.confirm:
            raise err("top_k", f"{self.top_k} exceeds confirm ({self.confirm}); allowed <= confirm")
        if self.population > self.budget:
            raise err("population", f"{self.population} exceeds budget ({self.budget}); allowed <= budget")

    def constraints(self) -> dict[str, dict[str, float]]:
        """{PROFILE: {COST: MAX}} with `latency_ms[:PRECISION]` spelled as the profile's own
        `latency_ms@PROFILE[:PRECISION]`."""
        return {p: {(own_latency(c, p) or c): float(v) for c, v in limits.items()}
                for p, limits in self.targets.items()}


def _experiment_name(name: str) -> str | None:
    return None if name and "/" not in name else f"invalid experiment name {name!r}; allowed a non-empty name without '/'"


SPACE_INPUT_KEYS = ("in_channels", "num_classes", "resolution")


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = spec(check=_experiment_name)
    space: str = spec()
    dataset: DatasetConfig = spec(factory=DatasetConfig, shorthand="name")  # `dataset: digits` is {name: digits}
    space_input: Mapping[str, int] = spec(factory=dict, check=lambda v: next(
        (f"{k}: unknown key; allowed: {', '.join(SPACE_INPUT_KEYS)}" for k in v if k not in SPACE_INPUT_KEYS), None))
    seed: int = 0
    num_trials: int = spec(12, ge=1)
    max_concurrent: int = spec(2, ge=1)
    output_dir: str = "runs"  # absolute once loaded
    storage_path: str | None = None  # Ray Tune storage (shared dir or cloud URI); default RUN_DIR
    max_failures: int = spec(0, ge=0)  # retries of a trial whose worker died or raised (node loss)
    top_k: int = spec(3, ge=1)
    train: TrainConfig = spec(factory=TrainConfig)  # validated by its own floor: TrainConfig.from_dict
    search: SearchConfig = spec(factory=SearchConfig)
    objective: ObjectiveConfig = spec(factory=ObjectiveConfig)
    evaluator: EvaluatorConfig = spec(factory=EvaluatorConfig)
    distill: DistillConfig = spec(factory=DistillConfig)
    export: ExportConfig = spec(factory=ExportConfig)
    compress: CompressConfig | None = None  # `nas compress` and the compress step of `nas run` (off when absent)
    supernet: SupernetConfig | None = None  # `nas supernet train` (defaults when absent)
    specialize: SpecializeConfig = spec(factory=SpecializeConfig)  # `nas specialize` (and after `nas supernet train`)
    resources: Resources = spec(factory=Resources)
    source: str = dataclasses.field(default="<dict>", compare=False)

    @property
    def run_dir(self) -> Path:
        return (Path(self.output_dir) / self.name).resolve()

    def check(self, err: Errors) -> None:
        if self.top_k > self.num_trials:
            raise err("top_k", f"{self.top_k} exceeds num_trials ({self.num_trials})")

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (what config.yaml holds; round-trips through `config_from_dict`)."""
        d = to_plain(self)
        d.pop("source")
        d["distill"]["teacher"] = self.distill.teacher.to_dict()
        return d


def build_section(cls: type, raw: Any, source: str) -> Any:
    """One section built on its own; `source` is 'FILE: KEY' or just 'KEY'."""
    file, _, key = source.rpartition(": ")
    return build(cls, raw, file, key)


def _resolve_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    teacher = cfg.distill.teacher
    evaluator = cfg.evaluator
    if evaluator.kind == "table":  # a shipped table by name, or a file
        try:
            evaluator = dataclasses.replace(evaluator, table=str(resolve_table(evaluator.table)))
        except NasError as e:
            raise NasError(f"{cfg.source}: evaluator.table: {e}") from None
    evaluator = dataclasses.replace(evaluator, run=absolute(evaluator.run))
    return dataclasses.replace(
        cfg, output_dir=absolute(cfg.output_dir), storage_path=absolute(cfg.storage_path), evaluator=evaluator,
        dataset=dataclasses.replace(cfg.dataset, path=absolute(cfg.dataset.path)),
        distill=dataclasses.replace(cfg.distill, teacher=dataclasses.replace(
            teacher, checkpoint=absolute(teacher.checkpoint))))


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
    """A --set value as YAML (a float field also takes YAML 1.1's string '5e4': see search_spaces.schema)."""
    try:
        return yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        return text


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override and validate an experiment config file."""
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise NasError(f"{path}: expected a mapping of config keys")
    return config_from_dict(apply_overrides(raw, overrides or [], str(path)), source=str(path))


def config_from_dict(raw: Mapping[str, Any], source: str = "<dict>") -> ExperimentConfig:
    """The one validator: every section typed and checked, paths made absolute."""
    if not isinstance(raw, Mapping):
        raise NasError(f"{source}: expected a mapping of config keys")
    raw = dict(raw)
    if "train" in raw:
        raw["train"] = TrainConfig.from_dict(raw["train"], source=f"{source}: train")
    if "dataset" in raw:
        try:
            raw["dataset"] = DataSpec.from_dict(raw["dataset"], source="dataset")
        except NasError as e:
            raise NasError(f"{source}: {e}") from None
    if isinstance(raw.get("objective"), Mapping) and isinstance(raw["objective"].get("constraints"), Mapping):
        err = Errors(source, "objective.constraints")
        raw["objective"] = {**raw["objective"], "constraints": {
            k: number(v, err, k) for k, v in raw["objective"]["constraints"].items()}}
    if isinstance(raw.get("specialize"), Mapping) and isinstance(raw["specialize"].get("targets"), Mapping):
        targets = {p: ({c: number(v, Errors(source, f"specialize.targets.{p}"), c) for c, v in limits.items()}
                       if isinstance(limits, Mapping) else limits)
                   for p, limits in raw["specialize"]["targets"].items()}
        raw["specialize"] = {**raw["specialize"], "targets": targets}
    cfg = build(ExperimentConfig, raw, source)
    return _resolve_paths(dataclasses.replace(cfg, source=source))
