"""Explain a finished search: `write_report(run_dir)` writes RUN_DIR/report/report.md and PNG plots.

Plots (matplotlib, no pyplot state): accuracy vs predicted latency and vs params for every trial
with the Pareto front, the winners (and their test accuracy before/after distillation) and
hand-designed reference architectures of the same space trained with the same budget;
the best score/accuracy so far over trials; the per-layer params, MACs and predicted latency
of the top winner. Reads trials.csv, winners.json, distill.json, infeasible.jsonl and
config.yaml; caches the reference trainings in RUN_DIR/references.json. Ray-free.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from evaluators.cost import analytic_cost
from evaluators.datasets import load
from evaluators.predict import evaluate
from evaluators.train import train
from nas.compress_report import CompressionReport, compressed_folders, read_compression_report
from nas.config import ExperimentConfig
from nas.objective import Objective
from nas.pareto import hypervolume
from nas.export.card import compression_tables
from nas.plots import (DEFAULT_PROFILE, best_so_far_figure, front_points, layer_breakdown,
                       layer_figure, pareto_figure, predicted_latency_ms)
from nas.rundir import (RESULT_LATENCY_PREFIX, experiment_from_run_dir, finite_float, read_distill, read_trials,
                        read_winners)
from search_spaces.architecture import Architecture
from search_spaces.errors import NasError
from search_spaces.space import SearchSpace

REPORT_DIR = "report"
REFERENCES_FILE = "references.json"
NUMERIC = ("params", "macs", "accuracy", "score", "epochs", "wall_s")


# ============================================================ plain helpers
def _fmt(v: Any, spec: str = ".4f") -> str:
    x = finite_float(v)
    return "–" if math.isnan(x) else format(x, spec)


def _int(v: Any) -> str:
    x = finite_float(v)
    return "–" if math.isnan(x) else f"{int(round(x)):,d}"


# ============================================================ run directory
@dataclass
class Run:
    """A finished run directory, parsed."""

    run_dir: Path
    cfg: ExperimentConfig
    space: SearchSpace
    objective: Objective
    trials: list[dict[str, Any]]  # trials.csv rows, numbers parsed; + 'latency_ms'
    winners: list[dict[str, Any]]
    distill: list[dict[str, Any]]  # normalised: rank, key, before, after, baseline
    distill_info: dict[str, Any]
    profile: str  # the profile of 'latency_ms'
    latency_source: str  # 'trials.csv' or 'predicted by the report'
    references: list[dict[str, Any]] = field(default_factory=list)
    notes: set[str] = field(default_factory=set)  # caveats the report states (e.g. latency fallback)

    @property
    def ok(self) -> list[dict[str, Any]]:
        """Trials trained to the end (status ok) with an accuracy: the ones fronts and winners use."""
        return [t for t in self.trials if t["status"] == "ok" and math.isfinite(t["accuracy"])]

    @property
    def trained(self) -> list[dict[str, Any]]:
        """Trials with an accuracy, including those a scheduler stopped early."""
        return [t for t in self.trials if t["status"] in ("ok", "stopped") and math.isfinite(t["accuracy"])]


def load_run(run_dir: str | Path) -> Run:
    """Parse a run directory (trials.csv is required; winners.json and distill.json are optional)."""
    run_dir = Path(run_dir).resolve()
    exp = experiment_from_run_dir(run_dir)
    cfg, space, objective = exp.cfg, exp.space, exp.objective
    rows = read_trials(run_dir)
    latency_cols = [c for c in (rows[0].keys() if rows else []) if c.startswith(RESULT_LATENCY_PREFIX)]
    wanted = [f"{RESULT_LATENCY_PREFIX}{p}" for p in cfg.objective.profiles]
    col = next((c for c in wanted if c in latency_cols), latency_cols[0] if latency_cols else None)
    profile = col[len(RESULT_LATENCY_PREFIX):] if col else DEFAULT_PROFILE
    cache: dict[str, float] = {}
    notes: set[str] = set()
    trials = []
    for i, r in enumerate(rows):
        t: dict[str, Any] = dict(r)
        for k in NUMERIC:
            t[k] = finite_float(r.get(k))
        t["status"] = r.get("status") or "failed"
        t["order"] = _order(r.get("trial_id", ""), i)
        lat = finite_float(r.get(col)) if col else math.nan
        if math.isnan(lat) and t.get("key"):
            if t["key"] not in cache:
                try:
                    arch = space.decode(t["key"])
                    cache[t["key"]] = predicted_latency_ms(arch, profile, notes)
                    if math.isnan(t["params"]):
                        c = analytic_cost(arch)
                        t["params"], t["macs"] = float(c.params), float(c.macs)
                except NasError:
                    cache[t["key"]] = math.nan
            lat = cache[t["key"]]
        t["latency_ms"] = lat
        trials.append(t)
    trials.sort(key=lambda t: t["order"])
    winners = [w.to_dict() for w in read_winners(run_dir)]
    report = read_distill(run_dir)
    distill = [{"rank": r.rank, "key": r.key, "before": r.before, "after": r.after, "baseline": r.baseline}
               for r in (report.rows if report else ())]
    return Run(run_dir, cfg, space, objective, trials, winners, distill, dict(report.info) if report else {}, profile,
               "trials.csv" if col else "predicted by the report", notes=notes)


def _order(trial_id: str, index: int) -> tuple[int, int]:
    """Start order of a trial: Tune ids end in a counter (`abc12_00007`); else the CSV row."""
    m = re.search(r"_(\d+)$", trial_id or "")
    return (0, int(m.group(1))) if m else (1, index)


# ============================================================ reference architectures
REFERENCE_BLOCKS: dict[str, tuple[Callable[[Any], bool], ...]] = {
    # most specific first; the first predicate some option of a layer satisfies picks that option
    "MobileNetV2-like (mb e6 k3)": (
        lambda o: o.block == "mb" and o.kernel == 3 and o.expansion == 6 and not o.se,
        lambda o: o.block == "mb" and o.kernel == 3 and not o.se,
        lambda o: o.block == "mb",
    ),
    "MobileNetV1-like (ds k3)": (
        lambda o: o.block == "ds" and o.kernel == 3,
        lambda o: o.block == "ds",
    ),
}


def reference_architectures(space: SearchSpace, objective: Objective | None = None) -> dict[str, Architecture]:
    """Hand-designed networks of `space`: every layer one fixed block, every stage at full depth.

    Widths (stage channels, head) are the middle options, or the smallest when the middle ones
    break the hard constraints of `objective` (a reference the search could never pick would
    not be a fair comparison). A space without the block in every layer gets no such reference.
    """
    out: dict[str, Architecture] = {}
    for name, preds in REFERENCE_BLOCKS.items():
        arch = None
        for width in (lambda n: n // 2, lambda n: 0):
            pick: dict[str, int] = {}
            for d in space.decisions():
                if d.name.endswith(".op"):
                    idx = next((i for p in preds for i, o in enumerate(d.options) if p(o)), None)
                    if idx is None:
                        break
                    pick[d.name] = idx
                elif d.name.endswith(".depth") or d.name == "resolution":
                    pick[d.name] = max(range(len(d.options)), key=lambda i: d.options[i])
                elif d.name == "width_mult":
                    pick[d.name] = d.options.index(1.0) if 1.0 in d.options else len(d.options) - 1
                else:
                    pick[d.name] = width(len(d.options))
            else:
                arch = space.from_choices(pick)
                if _feasible(objective, arch):
                    break
                continue
            break  # a layer without this block
        if arch is not None:
            out[name] = arch
    return out


def evaluate_references(run: Run, *, printer: Callable[..., None] = print,
                        archs: Mapping[str, Architecture] | None = None) -> list[dict[str, Any]]:
    """Train every reference architecture like a trial (same data, TrainConfig, seed), once.

    Results are cached in RUN_DIR/references.json and reused while key, training config and
    dataset are unchanged.
    """
    archs = dict(archs) if archs is not None else reference_architectures(run.space, run.objective)
    path = run.run_dir / REFERENCES_FILE
    cache = json.loads(path.read_text()) if path.exists() else {}
    stamp = {"train": run.cfg.train.to_dict(), "dataset": run.cfg.to_dict()["dataset"], "seed": run.cfg.seed}
    out, data = [], None
    for name, arch in archs.items():
        hit = cache.get(name)
        if not (hit and hit.get("key") == arch.key and hit.get("stamp") == stamp):
            c = run.cfg.dataset
            if data is None:
                data = load(c, seed=run.cfg.seed, resolution=run.space.resolutions[0],
                            channels=run.space.in_channels)
            printer(f"reference {name} {arch.key}: training with the search's budget ...", flush=True)
            res = train(arch, data, run.cfg.train)
            test_acc = float(evaluate(arch, res.variables, data.x_test, data.y_test)[0])
            hit = {"key": arch.key, "stamp": stamp, "val_accuracy": float(res.val_accuracy),
                   "test_accuracy": test_acc, "train_s": float(res.train_s)}
            cache[name] = hit
            path.write_text(json.dumps(cache, indent=2))

        cost = analytic_cost(arch)
        row = {"name": name, "key": arch.key, "accuracy": hit["val_accuracy"], "test_accuracy": hit["test_accuracy"],
               "params": float(cost.params), "macs": float(cost.macs),
               "latency_ms": predicted_latency_ms(arch, run.profile, run.notes), "feasible": _feasible(run.objective, arch)}
        try:
            row["score"] = run.objective.score(row["accuracy"], run.objective.costs(arch))
        except Exception:  # noqa: BLE001 - a cost the report cannot compute: no score
            row["score"] = math.nan
        out.append(row)
    return out


def _feasible(objective: Objective | None, arch: Architecture) -> bool:
    if objective is None:
        return True
    try:
        return objective.feasible(arch)
    except Exception:  # noqa: BLE001 - a cost the report cannot compute: treat as unchecked
        return True


# ============================================================ the report
def write_report(run_dir: str | Path, *, references: bool | Mapping[str, str] = True,
                 printer: Callable[..., None] = print) -> Path:
    """Write RUN_DIR/report/report.md with pareto.png, best_so_far.png and layers_winner1.png.

    Args:
      run_dir: a run directory written by `nas search` (config.yaml and trials.csv required;
        winners.json, distill.json and infeasible.jsonl used when present).
      references: True: train the hand-designed references of the space (`reference_architectures`)
        with the search's training config, once (cached in RUN_DIR/references.json); False: none;
        a mapping name -> architecture key: those instead.
      printer: progress messages (reference training).

    Returns:
      The path of report.md.

    Example:
      >>> write_report("runs/quickstart")
      PosixPath('runs/quickstart/report/report.md')
    """
    run = load_run(run_dir)
    if references:
        archs = None if references is True else {n: run.space.decode(k) for n, k in dict(references).items()}
        run.references = evaluate_references(run, printer=printer, archs=archs)
    out = run.run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.png"):
        stale.unlink()

    by_key = {t["key"]: t for t in run.ok}
    winners = [{**w, "accuracy": w.get("val_accuracy"), "latency_ms": by_key.get(w["key"], {}).get("latency_ms",
                math.nan), "params": w.get("params")} for w in run.winners]
    wmap = {w["key"]: w for w in winners}
    distill = [{**d, "latency_ms": wmap.get(d["key"], {}).get("latency_ms", math.nan),
                "params": wmap.get(d["key"], {}).get("params", math.nan)} for d in run.distill]
    lat_label = f"predicted latency on {run.profile} (ms)"
    figs: dict[str, Any] = {
        "pareto.png": pareto_figure(run.trained, winners=winners, distill=distill, references=run.references,
                                    latency_label=lat_label,
                                    title=f"{run.cfg.name}: {run.space.name} on {run.cfg.dataset.name}"),
        "best_so_far.png": best_so_far_figure(run.trials),
    }
    top = None
    if run.winners:
        top = Architecture.from_dict(run.winners[0]["architecture"]) if "architecture" in run.winners[0] \
            else run.space.decode(run.winners[0]["key"])
        figs["layers_winner1.png"] = layer_figure(top, DEFAULT_PROFILE, title=f"winner #1 {top.key}: cost per layer")
    for name, fig in figs.items():
        fig.savefig(out / name)
    path = out / "report.md"
    path.write_text(_markdown(run, winners, top))
    return path


# Markdown tables as f-strings: pandas.DataFrame.to_markdown needs tabulate, not a dependency, for a few rows.
def _markdown(run: Run, winners: list[dict[str, Any]], top: Architecture | None) -> str:
    cfg, trials = run.cfg, run.trials
    count = {s: sum(t["status"] == s for t in trials) for s in ("ok", "stopped", "failed", "infeasible")}
    ok = run.ok
    L: list[str] = [f"# Search report: {cfg.name}", ""]
    cost_txt = f"{cfg.objective.cost} (target {cfg.objective.target:g})" if cfg.objective.cost else "none"
    L += [f"- space `{run.space.name}` ({run.space.size():,d} architectures), dataset `{cfg.dataset.name}`, "
          f"algorithm `{cfg.search.algorithm}`, {cfg.num_trials} trials planned",
          f"- trials: {count['ok']} ok, {count['stopped']} stopped early, {count['failed']} failed, "
          f"{count['infeasible']} infeasible (rejected before training)",
          f"- objective: score = accuracy × soft penalty on {cost_txt}; hard constraints: "
          + (", ".join(f"{k} ≤ {v:g}" for k, v in cfg.objective.constraints.items()) or "none"),
          f"- latency: predicted on `{run.profile}` ({run.latency_source})"]
    L += [f"- note: {n}" for n in sorted(run.notes)]
    if ok:
        best = max(ok, key=lambda t: finite_float(t["score"]) if math.isfinite(finite_float(t["score"])) else -math.inf)
        L.append(f"- best score {_fmt(best['score'])} (`{best['key']}`, validation accuracy {_fmt(best['accuracy'])}); "
                 f"best validation accuracy {_fmt(max(t['accuracy'] for t in ok))}")
    L += ["", "## Accuracy vs cost", "",
          "Validation accuracy of every trained trial against predicted latency and parameters; the line is the "
          "Pareto front, stars are the winners (labelled by rank and key), green markers their *test* accuracy "
          "before and after distillation, diamonds hand-designed networks of the same space trained with the same "
          "budget.", "", "![accuracy vs cost](pareto.png)", ""]
    for cost, unit in (("latency_ms", "ms"), ("params", "")):
        front = front_points(ok, cost)
        if not front:
            continue
        pts = [{"accuracy": t["accuracy"], cost: t[cost]} for t in ok if math.isfinite(finite_float(t[cost]))]
        ref = (min(p["accuracy"] for p in pts), max(p[cost] for p in pts))
        hv = hypervolume(pts, ref, [("accuracy", "max"), (cost, "min")])
        L += [f"Pareto front, accuracy vs {'latency' if cost == 'latency_ms' else 'params'} "
              f"({len(front)} of {len(ok)} trials; hypervolume {hv:.4g} w.r.t. (worst accuracy, largest cost)):", "",
              "| key | val accuracy | score | params | MACs | latency (ms) |", "|---|---:|---:|---:|---:|---:|"]
        L += [f"| `{p['key']}` | {_fmt(p['accuracy'])} | {_fmt(p['score'])} | {_int(p['params'])} | {_int(p['macs'])} "
              f"| {_fmt(p['latency_ms'])} |" for p in front]
        L.append("")
    L += ["## Winners", ""]
    if winners:
        dist = {d["key"]: d for d in run.distill}
        has_base = any(math.isfinite(d["baseline"]) for d in run.distill)
        head = "| rank | key | architecture | score | val accuracy | params | MACs | latency (ms) |"
        sep = "|---:|---|---|---:|---:|---:|---:|---:|"
        if run.distill:
            head += " test before KD |" + (" test fine-tuned, no KD |" if has_base else "") + " test after KD |"
            sep += "---:|" + ("---:|" if has_base else "") + "---:|"
        L += [head, sep]
        for w in winners:
            arch = _arch(run, w)
            desc = " ".join(arch.describe()[1:-1]) if arch else ""
            row = (f"| {w['rank']} | `{w['key']}` | {desc} | {_fmt(w.get('score'))} | {_fmt(w.get('accuracy'))} | "
                   f"{_int(w.get('params'))} | {_int(w.get('macs'))} | {_fmt(w.get('latency_ms'))} |")
            if run.distill:
                d = dist.get(w["key"], {})
                row += f" {_fmt(d.get('before'))} |" + (f" {_fmt(d.get('baseline'))} |" if has_base else "") \
                    + f" {_fmt(d.get('after'))} |"
            L.append(row)
        if run.distill_info.get("teacher"):
            t, info = run.distill_info["teacher"], run.distill_info
            how = ", ".join(f"{k} {info[k]}" for k in ("temperature", "alpha", "epochs") if k in info)
            L += ["", f"Distillation teacher `{t.get('key', '?')}`"
                      + (f" ({t['source']})" if t.get("source") else "")
                      + f", test accuracy {_fmt(t.get('test_accuracy'))}" + (f"; {how}" if how else "") + "."]
    else:
        L.append("No winners (winners.json missing or empty).")
    L.append("")
    if run.references:
        L += ["## Hand-designed references", "",
              "Fixed networks of the same space, trained exactly like a trial (same data split, training config "
              "and seed); cached in `references.json`.", "",
              "| reference | key | val accuracy | test accuracy | score | params | MACs | latency (ms) | feasible |",
              "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in run.references:
            L.append(f"| {r['name']} | `{r['key']}` | {_fmt(r['accuracy'])} | {_fmt(r['test_accuracy'])} | "
                     f"{_fmt(r['score'])} | {_int(r['params'])} | {_int(r['macs'])} | {_fmt(r['latency_ms'])} | "
                     f"{'yes' if r['feasible'] else 'no'} |")
        if winners:
            w = winners[0]
            L += ["", "Winner #1 against each reference:", ""]
            for r in run.references:
                L.append(f"- vs {r['name']}: validation accuracy {finite_float(w.get('accuracy')) - r['accuracy']:+.4f}, "
                         f"params ×{finite_float(w.get('params')) / r['params']:.2f}, "
                         f"latency ×{finite_float(w.get('latency_ms')) / r['latency_ms']:.2f}")
        L.append("")
    L += compression_section(run.run_dir)
    L += ["## Progress over trials", "", "![best so far](best_so_far.png)", ""]
    if top is not None:
        rows = layer_breakdown(top, DEFAULT_PROFILE)
        L += [f"## Cost per layer of winner #1 (`{top.key}`)", "", "![per-layer cost](layers_winner1.png)", "",
              f"| layer | params | MACs | latency on {DEFAULT_PROFILE} (ms) |", "|---|---:|---:|---:|"]
        L += [f"| {r['name']} | {r['params']:,d} | {r['macs']:,d} | {r['latency_ms']:.4f} |" for r in rows]
        L.append("")
    failed = [t for t in trials if t["status"] == "failed"]
    if failed:
        L += ["## Failed trials", "", "| trial | key | error |", "|---|---|---|"]
        L += [f"| {t.get('trial_id', '')} | `{t.get('key', '')}` | {str(t.get('error', '')).replace('|', '/')} |"
              for t in failed]
        L.append("")
    return "\n".join(L)


def _arch(run: Run, w: Mapping[str, Any]) -> Architecture | None:
    try:
        return Architecture.from_dict(w["architecture"]) if "architecture" in w else run.space.decode(w["key"])
    except (NasError, KeyError, TypeError, ValueError):
        return None


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}x"


def _pt(v: float | None) -> str:
    return "–" if v is None else f"{v:+.2f}"


def compression_section(run_dir: Path) -> list[str]:
    """'## Compression': every model under RUN_DIR/compressed/ with its compression report (nothing
    when the run has none). The figures are read from each folder's metrics.json, never recomputed."""
    folders = compressed_folders(run_dir)
    if not folders:
        return []
    reports: list[CompressionReport] = []
    unreadable: list[str] = []
    for f in folders:
        try:
            reports.append(read_compression_report(f))
        except NasError as e:
            unreadable.append(str(e))
    L = ["## Compression", "",
         "Models written by `nas compress` (RUN_DIR/compressed/), each against the winner it was compressed "
         "from: ratios are before / after; accuracy on the test split (change in points); ONNX Runtime speedups "
         "measured at compression time (one thread, alternated), the original fp32 over the compressed fp32 and "
         "over the compressed int8; each folder's README.md has the full report.", "",
         "| folder | from | techniques | params | MACs | fp32 file | shipped file | test acc. before | after (pt) "
         "| int8 (pt) | speedup fp32 b1 / b32 | speedup int8 b1 / b32 |",
         "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in reports:
        L.append(f"| `{r.name}` | `{r.pruned_from}` | {r.techniques()} | {_x(r.params.ratio)} | {_x(r.macs.ratio)} "
                 f"| {_x(r.onnx_bytes.ratio)} | {_x(r.shipped_bytes.ratio if r.shipped_bytes else None)} "
                 f"| {_fmt(r.accuracy_before)} | {_fmt(r.accuracy_after)} ({_pt(r.accuracy_change_pt)}) "
                 f"| {_fmt(r.accuracy_int8)} ({_pt(r.int8_change_pt)}) "
                 f"| {_x(r.speedup('after', 'batch1'))} / {_x(r.speedup('after', 'batch32'))} "
                 f"| {_x(r.speedup('after_int8', 'batch1'))} / {_x(r.speedup('after_int8', 'batch32'))} |")
    L += [f"- {u}" for u in unreadable]
    for r in reports:
        L += ["", f"### `{r.name}`", "", *compression_tables(r)]
    L.append("")
    return L
