"""Compression stage: prune, factorize and/or quantize a run's winners, fine-tune with distillation, write a model folder.

`run_compress(run_dir, winner=N, options={'prune': 'macs=0.5', 'lowrank': 'energy=0.9', 'qat': True})`
takes winner N's weights (its distilled weights when `nas distill` ran, else its search
checkpoint) and chains, in this order, the techniques asked for: pruning (`evaluators.prune`:
channels removed by importance one-shot or over `steps` AGP steps, fine-tuned after each step),
low-rank factorization (`evaluators.lowrank`: truncated SVD of the 1x1 convs and the classifier,
then `lowrank_epochs` of fine-tuning), quantization-aware training (`evaluators.qat`). Fine-tuning
uses knowledge distillation from the run's teacher (the `distill.teacher` of the experiment,
through the same `evaluators.train.train` path as `nas distill`). One folder per winner,
`RUN_DIR/compressed/NN-KEY-TAG/`:

| file | what |
|---|---|
| architecture.json | {'architecture': the compressed network, 'pruned_from': the original (before any technique), 'input': ...} |
| flax/variables.msgpack | the fine-tuned weights (Flax msgpack) |
| model.onnx | the ONNX export (reference implementation, dynamic batch) |
| metrics.json | params, MACs, bytes before/after and their ratios; test accuracy before/after; measured ONNX Runtime latency of both at batch 1 and 32 and the speedups; energy per profile; with lowrank, 'lowrank': per-layer ranks and the measured latency of the network before/after factorizing |

`nas.load(folder)` loads it like an export folder. Everything is validated before anything is
trained or written; a folder is written under a hidden `.NAME.partial` name and renamed when done.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx

from evaluators.cost import analytic_cost
from evaluators.datasets import load as load_data
from evaluators.lowrank import check_reachable, choose_ranks, factorize, factorized_architecture, measure_layers, site_index
from evaluators.onnx_export import ort_session, run, to_onnx
from evaluators.predict import evaluate
from evaluators.prune import agp_fractions, floor_architecture, prune, pruned_key, recalibrate_bn, taylor_grads
from evaluators.qat import export_variables, qat_predict, qat_train, range_hints
from evaluators.quantize import RangeHints, quantize_static_int8, resolve_weight_range
from evaluators.train import train
from evaluators.variables import load_variables, save_variables
from nas.compress_report import compression_report, measure_onnx_latency  # noqa: F401 (measure_onnx_latency: used by benchmarks)
from nas.config import CompressConfig, build_section
from nas.export.card import compressed_card
from nas.preflight import preflight
from nas.rundir import TEACHER_DIR, experiment_from_run_dir, load_winners, read_distill, winner_weights
from nas.teacher import cached_outputs, resolve_teacher, search_candidates
from search_spaces.architecture import Architecture
from search_spaces.errors import NasError
from search_spaces.schema import to_plain

FLAGS = ("lowrank", "qat")  # techniques given by a flag: a command line's False means "not given"
TAYLOR_IMAGES = 512


# ============================================================ the stage
def run_compress(run_dir: str | Path, *, winner: int | None = None, options: Mapping[str, Any] | None = None,
                 out: str | Path | None = None, force: bool = False, printer=print) -> list[Path]:
    """Compress winner `winner` (default: every winner) of `run_dir`; returns the folders written.

    Args:
      run_dir: a finished search's run directory.
      winner: a winner's rank, or None for all.
      options: the compress options (see `CompressConfig`); default the experiment's `compress:` section.
      out: output folder (default RUN_DIR/compressed).
      force: replace existing result folders of the same name.

    Raises:
      NasError: bad options, a run without winners or checkpoints, an unknown rank, an existing
        result folder without `force`, a target the network cannot reach; nothing written.
    """
    run_dir = Path(run_dir).resolve()
    exp = experiment_from_run_dir(run_dir)
    cfg = exp.cfg
    if options is not None:
        c = build_section(CompressConfig, options, "compress")
    else:
        c = cfg.compress or build_section(CompressConfig, {}, f"{cfg.source}: compress")  # absent: no technique
    preflight(dataclasses.replace(cfg, compress=dataclasses.replace(c, enabled=True)), ("compress",))
    winners = load_winners(run_dir)
    if winner is not None:
        ranks = [w.rank for w in winners]
        if winner not in ranks:
            raise NasError(f"--winner: {winner}; allowed: {', '.join(map(str, ranks))}")
        winners = [w for w in winners if w.rank == winner]
    distilled = read_distill(run_dir)
    out = Path(out).resolve() if out else run_dir / "compressed"
    target, lr_target = c.target(), c.lowrank_target()
    plans = []
    for w in winners:
        arch = w.architecture
        folder = out / f"{w.rank:02d}-{_safe(arch.key)}-{c.tag()}"
        if folder.exists() and not force:
            raise NasError(f"{folder}: already exists; use --force to replace it")
        weights = winner_weights(run_dir, w, distilled)  # the distilled student when `nas distill` ran
        # the target must be reachable before anything is trained
        floor = floor_architecture(arch, c.min_keep, c.divisor)
        if target is not None and target.cost_fn()(floor) > target.absolute(arch):
            what = "one channel per layer" if c.min_keep == 0 else f"compress.min_keep={c.min_keep:g} of each layer"
            raise NasError(f"compress.prune: {target.label()} for winner {w.rank} is below {what} "
                           f"({target.kind} {target.cost_fn()(floor):g} at the least); allowed "
                           f"{target.kind} >= {target.cost_fn()(floor) / (1 if target.kind == 'latency_ms' else target.cost_fn()(arch)):.3g}")
        if lr_target is not None and target is None:  # after pruning it is checked again on the pruned network
            check_reachable(arch, lr_target, divisor=c.divisor)
        plans.append((w, arch, weights, folder))

    data = load_data(cfg.dataset, seed=cfg.seed, resolution=exp.space.resolutions[0], channels=exp.space.in_channels)
    if data.stream is not None:  # pruning reads training images (BatchNorm re-estimation, Taylor scores, calibration)
        raise NasError(f"{cfg.source}: dataset.streaming: dataset '{data.name}' streams its training split; "
                       f"compression needs it in memory (set dataset.streaming: false)")
    d = cfg.distill
    logits = None
    teacher_info = None
    if c.kd and (c.epochs or (c.lowrank_target() is not None and c.lowrank_epochs)):
        teacher_train = dataclasses.replace(exp.train, epochs=d.teacher_epochs or exp.train.epochs)
        teacher = resolve_teacher(d.teacher, exp.space, data, teacher_train, run_dir / TEACHER_DIR, printer,
                                  candidates=search_candidates(run_dir), source=f"{cfg.source}: distill.teacher")
        logits, _, _, _ = cached_outputs(teacher, data, run_dir / TEACHER_DIR)
        teacher_info = {"key": teacher.key, "kind": teacher.kind, "test_accuracy": teacher.test_accuracy}
    kd = d.kd() if logits is not None else None

    written = []
    for w, arch, weights, folder in plans:
        t0 = time.perf_counter()
        variables = load_variables(weights)
        acc_before = evaluate(arch, variables, data.x_test, data.y_test)[0]
        small, sv, history = compress_one(arch, variables, data, c, exp.train, kd=kd, teacher_logits=logits,
                                          printer=printer)
        lowrank_info = None
        if c.lowrank_target() is not None:
            small, sv, lowrank_info = lowrank_one(small, sv, data, c, exp.train, kd=kd, teacher_logits=logits,
                                                  printer=printer)
        qat_info = hints = None
        if c.qat:
            wr = resolve_weight_range(c.int8_weight_range)
            folded, ranges, qhist = qat_train(small, sv, data, epochs=c.qat_epochs, learning_rate=c.qat_learning_rate,
                                              teacher_logits=logits, calibration_images=c.calibration_images,
                                              seed=exp.train.seed, weight_range=wr)
            fake = qat_predict(small, folded, ranges, data.x_test, weight_range=wr)
            qat_info = {"history": qhist, "fake_quant_test_accuracy": float(np.mean(fake.argmax(-1) == data.y_test)),
                        "epochs": c.qat_epochs, "learning_rate": c.qat_learning_rate, "weight_range": wr}
            hints = range_hints(small, folded, ranges, data.x_train[:64], weight_range=wr)
            sv = export_variables(small, folded, weight_range=wr)
        acc_after = evaluate(small, sv, data.x_test, data.y_test)[0]
        metrics = {"rank": w.rank, "key": small.key, "pruned_from": arch.key, "dataset": data.name,
                   "weights_from": weights.name, "teacher": teacher_info,
                   "options": to_plain(c), "steps": history,
                   "test_accuracy_before": acc_before, "test_accuracy": acc_after,
                   "accuracy_drop_pt": 100 * (acc_before - acc_after)}
        if lowrank_info is not None:
            metrics["lowrank"] = lowrank_info
        if qat_info is not None:
            metrics["qat"] = qat_info
        _write_folder(folder, arch, variables, small, sv, data, metrics, c, force, hints)
        metrics = json.loads((folder / "metrics.json").read_text())
        printer(f"winner {w.rank} {arch.key} -> {small.key}{' (QAT int8)' if c.qat else ''}: "
                f"MACs x{metrics['ratios']['macs']:.2f} "
                f"params x{metrics['ratios']['params']:.2f}, test accuracy {acc_before:.4f} -> {acc_after:.4f}"
                + (f", ONNX Runtime speedup b1 {metrics['speedup']['batch1']:.2f}x b32 "
                   f"{metrics['speedup']['batch32']:.2f}x" if metrics.get("speedup") else "")
                + f" ({time.perf_counter() - t0:.1f}s) -> {folder}", flush=True)
        written.append(folder)
    return written


def compress_one(arch: Architecture, variables: Any, data, c: CompressConfig, base_train: Any, *,
                 kd: Any = None, teacher_logits: np.ndarray | None = None,
                 printer=print) -> tuple[Architecture, Any, list[dict[str, Any]]]:
    """Prune `arch` to `c.prune` over `c.steps` AGP steps, fine-tuning after each; returns
    (pruned architecture, its variables, one record per step)."""
    target = c.target()
    if target is None:
        return arch, variables, []
    cost = target.cost_fn()
    full = cost(arch)
    final = target.absolute(arch) / full
    per_step = [c.epochs // c.steps + (1 if s < c.epochs % c.steps else 0) for s in range(c.steps)]
    current, v = arch, variables
    history = []
    for s, frac in enumerate(agp_fractions(final, c.steps)):
        grads = None
        if c.criterion == "taylor":
            n = min(TAYLOR_IMAGES, len(data.x_train))
            grads = taylor_grads(current, v, data.x_train[:n], data.y_train[:n])
        current, v, _ = prune(current, v, frac * full, cost, c.criterion, grads=grads, min_keep=c.min_keep,
                              divisor=c.divisor, cost_aware=c.cost_aware)
        v = recalibrate_bn(current, v, data.x_train)
        current = dataclasses.replace(current, key=pruned_key(arch.key, cost(current) / full))
        rec: dict[str, Any] = {"step": s + 1, "kept_fraction": cost(current) / full, "epochs": per_step[s],
                               "learning_rate": finetune_rate(c, base_train)}
        if per_step[s]:
            v, rec["val_accuracy"] = finetune(current, v, data, per_step[s], c, base_train, kd=kd,
                                              teacher_logits=teacher_logits)
        history.append(rec)
        printer(f"  step {s + 1}/{c.steps}: {target.kind} kept {rec['kept_fraction']:.3f}"
                + (f", val accuracy {rec['val_accuracy']:.4f}" if "val_accuracy" in rec else ""), flush=True)
    return current, v, history


def finetune_rate(c: CompressConfig, base_train: Any) -> float:
    """The fine-tuning's peak learning rate: `c.learning_rate`, else the run's training rate (rewinding)."""
    return c.learning_rate if c.learning_rate is not None else base_train.learning_rate


def finetune(arch: Architecture, variables: Any, data, epochs: int, c: CompressConfig, base_train: Any, *,
             kd: Any = None, teacher_logits: np.ndarray | None = None) -> tuple[Any, float]:
    """`epochs` of fine-tuning (cosine from `finetune_rate(c, base_train)`, KD when `kd`); returns
    (variables, val accuracy)."""
    tcfg = dataclasses.replace(base_train, epochs=epochs, learning_rate=finetune_rate(c, base_train),
                               schedule="cosine", warmup_epochs=0)
    res = train(arch, data, tcfg, init_variables=variables, teacher_logits=teacher_logits, kd=kd)
    return res.variables, res.val_accuracy


def lowrank_one(arch: Architecture, variables: Any, data, c: CompressConfig, base_train: Any, *,
                kd: Any = None, teacher_logits: np.ndarray | None = None,
                printer=print) -> tuple[Architecture, Any, dict[str, Any]]:
    """Factorize `arch` for `c.lowrank` (evaluators.lowrank), re-estimate BatchNorm statistics,
    fine-tune `c.lowrank_epochs`; returns (factorized architecture, its variables, a record).

    With `c.lowrank_keep == 'latency'` (and `c.latency_budget_s` > 0) each layer the ranks would
    factorize is first timed as a one-layer ONNX Runtime model, whole and factorized, at batch 1 and
    32, and stays whole unless factorized is faster at both. The record holds the target, per-conv
    ranks, the per-layer measurements, params/MACs kept and - with `c.latency_budget_s` - the ONNX
    Runtime latency of the whole network before and after factorizing (batch 1 and 32, alternated)."""
    target = c.lowrank_target()
    ranks = choose_ranks(arch, variables, target, c.divisor)
    measured, slower = None, set()
    if ranks and c.lowrank_keep == "latency" and c.latency_budget_s > 0:
        measured = measure_layers(arch, factorized_architecture(arch, ranks), c.latency_budget_s)
        slower = {m["index"] for m in measured if not (m["speedup"]["batch1"] > 1 and m["speedup"]["batch32"] > 1)}
        for m in measured:
            m["kept"] = m["index"] not in slower
        ranks = {st: r for st, r in ranks.items() if site_index(st, arch) not in slower}
    small, sv, layers = factorize(arch, variables, ranks)
    a, b = analytic_cost(arch), analytic_cost(small)
    rec: dict[str, Any] = {"target": target.label(), "keep": c.lowrank_keep, "key_before": arch.key, "layers": layers,
                           "factorized": sum(1 for l in layers if l["rank"] is not None),
                           "params_kept": b.params / a.params, "macs_kept": b.macs / a.macs,
                           "epochs": c.lowrank_epochs}
    if measured is not None:
        rec["measured_layers"] = measured
    if not small.factorized:
        why = (f"each of the {len(slower)} cheaper factorized layer(s) measured slower in ONNX Runtime at batch 1 or 32"
               if slower else "no 1x1 conv gets cheaper (rank r with r (cin + cout) < cin cout)")
        rec["note"] = f"left whole: {why}"
        printer(f"  lowrank {target.label()}: left whole ({why})", flush=True)
        return arch, variables, rec
    sv = recalibrate_bn(small, sv, data.x_train)
    if c.lowrank_epochs:
        sv, rec["val_accuracy"] = finetune(small, sv, data, c.lowrank_epochs, c, base_train, kd=kd,
                                           teacher_logits=teacher_logits)
    if c.latency_budget_s > 0:
        lat = measure_onnx_latency({"whole": to_onnx(arch, variables), "factorized": to_onnx(small, sv)},
                                   data.x_test, c.latency_budget_s)
        rec["latency_ms"] = lat
        rec["speedup"] = {bk: lat["whole"][bk] / lat["factorized"][bk] for bk in ("batch1", "batch32")}
    printer(f"  lowrank {target.label()}: {rec['factorized']}/{len(layers)} convs factorized"
            + (f" ({len(slower)} layer(s) left whole: slower in ONNX Runtime)" if slower else "") + ", params kept "
            f"{rec['params_kept']:.3f}, MACs kept {rec['macs_kept']:.3f}"
            + (f", val accuracy {rec['val_accuracy']:.4f}" if "val_accuracy" in rec else "")
            + (f", ONNX Runtime speedup b1 {rec['speedup']['batch1']:.2f}x b32 {rec['speedup']['batch32']:.2f}x"
               if "speedup" in rec else ""), flush=True)
    return small, sv, rec


# ============================================================ the folder
def _safe(key: str) -> str:
    return re.sub(r"[^0-9A-Za-z-]", "-", key)


def _write_folder(folder: Path, arch: Architecture, variables: Any, small: Architecture, sv: Any, data,
                  metrics: dict[str, Any], c: CompressConfig, force: bool, hints: RangeHints | None = None) -> None:
    """Write the result folder (staged, then renamed); with `c.qat`, the int8 model quantizes each
    activation over the range QAT trained with (`hints`) and its weights to QAT's weight range."""
    stage = folder.parent / f".{folder.name}.partial"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    try:
        (stage / "architecture.json").write_text(json.dumps(
            {"architecture": small.to_dict(), "pruned_from": arch.to_dict(),
             "input": {"layout": "NHWC", "normalization_mean": list(map(float, data.mean)),
                       "normalization_std": list(map(float, data.std))}}, indent=2))
        save_variables(stage / "flax" / "variables.msgpack", sv)
        model = to_onnx(small, sv)
        for k, val in {"space": small.space, "key": small.key, "layout": "NHWC"}.items():
            model.metadata_props.add(key=k, value=val)
        onnx.save(model, str(stage / "model.onnx"))
        int8 = None
        if c.qat:
            rng = np.random.default_rng(0)
            calib = data.x_train[rng.choice(len(data.x_train), min(c.calibration_images, len(data.x_train)),
                                            replace=False)]
            metrics["int8"] = quantize_static_int8(stage / "model.onnx", stage / "model.int8.onnx", calib,
                                                   method="minmax", float_se=c.int8_float_se, range_hints=hints,
                                                   weight_range=metrics["qat"]["weight_range"])
            int8 = onnx.load(str(stage / "model.int8.onnx"))
            sess = ort_session(str(stage / "model.int8.onnx"))
            logits = run(sess, data.x_test, batch=256)
            metrics["int8"]["test_accuracy"] = float(np.mean(logits.argmax(-1) == data.y_test))
            metrics["int8"]["accuracy_drop_pt"] = 100 * (metrics["test_accuracy_before"] - metrics["int8"]["test_accuracy"])
        before = to_onnx(arch, variables)
        metrics.update(compression_report(arch, small, before, model, data.x_test, c.latency_budget_s, int8,
                                          calibration=data.x_train[:c.calibration_images]))
        (stage / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (stage / "README.md").write_text(compressed_card(small, metrics, folder.name))
        if folder.exists() and force:
            shutil.rmtree(folder)
        stage.rename(folder)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def compress_options(run_dir: str | Path, **given: Any) -> dict[str, Any]:
    """The experiment's `compress:` section with the options given on the command line (None: not given)
    laid over it; `lowrank`/`qat` count only when True."""
    exp = experiment_from_run_dir(Path(run_dir).resolve())
    base = to_plain(exp.cfg.compress) if exp.cfg.compress is not None else {}
    for k, v in given.items():
        if v is not None and (v is not False or k not in FLAGS):
            base[k] = v
    return base
