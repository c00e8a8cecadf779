"""Figures and the numbers they plot (Ray-free): the Pareto front, best-so-far and per-layer cost.

Shared by the report (`nas.report`, PNG files) and the live monitor (`nas.monitor`, TensorBoard
images); matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from evaluators.cost import analytic_cost
from evaluators.hardware import analytic_latency
from evaluators.latency import latency_breakdown
from nas.pareto import pareto_front
from nas.rundir import finite_float
from search_spaces.architecture import Architecture
from search_spaces.errors import NasError

DEFAULT_PROFILE = "host"
COLORS = {"trial": "#9aa5b1", "stopped": "#d0d5da", "front": "#1f77b4", "winner": "#d62728", "kd": "#2ca02c",
          "reference": "#ff7f0e"}


def predicted_latency_ms(arch: Architecture, profile: str = DEFAULT_PROFILE, notes: set[str] | None = None) -> float:
    """Predicted latency (ms): the calibrated LUT when it covers `arch`, else the analytic roofline.

    `profile` may carry a precision ('host:int8', as in the cost `latency_ms@host:int8`). An
    unusable LUT (stale format, corrupt, missing at int8) falls back to the roofline; the reason
    goes to `notes`.
    """
    name, _, precision = profile.partition(":")
    try:
        return float(latency_breakdown(arch, name, precision=precision or None).total_ms)
    except NasError as e:
        if notes is not None:
            notes.add(f"latency table not used ({e}); analytic roofline instead")
        return float(analytic_latency(arch, name, precision or None).total_ms)


def _figure(w: float, h: float, ncols: int = 1, nrows: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def render_rgb(fig) -> np.ndarray:
    """A matplotlib Figure as an (H, W, 3) uint8 array (for TensorBoard image summaries)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def front_points(points: Sequence[Mapping[str, Any]], cost: str) -> list[Mapping[str, Any]]:
    idx = pareto_front([{"accuracy": finite_float(p.get("accuracy")), cost: finite_float(p.get(cost))} for p in points],
                       [("accuracy", "max"), (cost, "min")])
    return sorted((points[i] for i in idx), key=lambda p: (finite_float(p.get(cost)), -finite_float(p.get("accuracy"))))


def pareto_figure(results: Sequence[Mapping[str, Any]], *, winners: Sequence[Mapping[str, Any]] = (),
                  distill: Sequence[Mapping[str, Any]] = (), references: Sequence[Mapping[str, Any]] = (),
                  latency_label: str = "predicted latency (ms)", title: str = ""):
    """Accuracy vs latency and vs params: trials, Pareto front, winners, distillation, references.

    `results` are dicts with accuracy, latency_ms, params (and key, status); `winners` dicts with
    rank, key, accuracy, latency_ms, params; `distill` dicts with the winner's latency_ms, params
    and test accuracy `before`/`after`; `references` dicts with name, accuracy, latency_ms, params.
    """
    fig, axes = _figure(11, 4.4, ncols=2)
    for ax, cost, label in ((axes[0][0], "latency_ms", latency_label), (axes[0][1], "params", "parameters")):
        pts = [r for r in results if math.isfinite(finite_float(r.get("accuracy"))) and math.isfinite(finite_float(r.get(cost)))]
        full = [r for r in pts if r.get("status", "ok") == "ok"]
        part = [r for r in pts if r.get("status", "ok") != "ok"]
        if full:
            ax.scatter([finite_float(r[cost]) for r in full], [finite_float(r["accuracy"]) for r in full], s=18,
                       color=COLORS["trial"], label=f"trials ({len(full)})", zorder=2)
        if part:
            ax.scatter([finite_float(r[cost]) for r in part], [finite_float(r["accuracy"]) for r in part], s=14, marker="v",
                       color=COLORS["stopped"], label=f"stopped early ({len(part)})", zorder=1)
        front = front_points(full, cost)
        if front:
            ax.step([finite_float(p[cost]) for p in front], [finite_float(p["accuracy"]) for p in front], where="post",
                    color=COLORS["front"], lw=1.5, zorder=3)
            ax.scatter([finite_float(p[cost]) for p in front], [finite_float(p["accuracy"]) for p in front], s=90,
                       facecolor="none", edgecolor=COLORS["front"], lw=1.5, label="Pareto front", zorder=4)
        wins = [w for w in winners if math.isfinite(finite_float(w.get(cost))) and math.isfinite(finite_float(w.get("accuracy")))]
        if wins:
            ax.scatter([finite_float(w[cost]) for w in wins], [finite_float(w["accuracy"]) for w in wins], marker="*", s=150,
                       color=COLORS["winner"], edgecolor="black", lw=0.5, label="winners (val)", zorder=6)
            for w in wins:
                ax.annotate(f"#{w['rank']} {w['key']}", (finite_float(w[cost]), finite_float(w["accuracy"])), fontsize=7,
                            xytext=(5, 5), textcoords="offset points", color=COLORS["winner"])
        kd = [d for d in distill if math.isfinite(finite_float(d.get(cost)))]
        if kd:
            for i, d in enumerate(kd):
                x, b, a = finite_float(d[cost]), finite_float(d.get("before")), finite_float(d.get("after"))
                if math.isfinite(b):
                    ax.scatter([x], [b], marker="o", s=30, facecolor="white", edgecolor=COLORS["kd"], zorder=5,
                               label="winners, test before KD" if i == 0 else None)
                if math.isfinite(a):
                    ax.scatter([x], [a], marker="P", s=60, color=COLORS["kd"], zorder=5,
                               label="winners, test after KD" if i == 0 else None)
                if math.isfinite(a) and math.isfinite(b):
                    ax.annotate("", (x, a), (x, b), arrowprops={"arrowstyle": "->", "color": COLORS["kd"], "lw": 1})
        refs = [r for r in references if math.isfinite(finite_float(r.get(cost))) and math.isfinite(finite_float(r.get("accuracy")))]
        for i, r in enumerate(refs):
            ax.scatter([finite_float(r[cost])], [finite_float(r["accuracy"])], marker="D", s=55, color=COLORS["reference"],
                       edgecolor="black", lw=0.5, zorder=6, label="hand-designed (val)" if i == 0 else None)
            ax.annotate(str(r["name"]).split(" (")[0], (finite_float(r[cost]), finite_float(r["accuracy"])), fontsize=7,
                        xytext=(5, -10), textcoords="offset points", color=COLORS["reference"])
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy")
        ax.grid(True, alpha=0.3)
        if cost == "params":
            ax.set_xscale("log")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        axes[0][1].legend(handles, labels, fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def best_so_far_figure(trials: Sequence[Mapping[str, Any]]):
    """Per-trial score and accuracy (dots) and the best so far (lines) over trials in start order."""
    fig, axes = _figure(7, 3.6)
    ax = axes[0][0]
    done = [t for t in trials if t["status"] in ("ok", "stopped", "failed")]
    xs = np.arange(1, len(done) + 1)
    full = np.array([t["status"] == "ok" for t in done], dtype=bool)
    for metric, color in (("score", COLORS["front"]), ("accuracy", COLORS["winner"])):
        vals = np.array([finite_float(t.get(metric)) for t in done], dtype=float)
        if not len(vals) or np.isnan(vals).all():
            continue
        # the best-so-far lines count fully trained trials only (like the winners); dots show all
        best = np.fmax.accumulate(np.where(np.isnan(vals) | ~full, -np.inf, vals))
        best[np.isinf(best)] = np.nan
        ax.scatter(xs, vals, s=12, color=color, alpha=0.4)
        ax.step(xs, best, where="post", color=color, lw=1.8, label=f"best {metric} so far")
    failed = [i + 1 for i, t in enumerate(done) if t["status"] == "failed"]
    if failed:
        ax.scatter(failed, [ax.get_ylim()[0]] * len(failed), marker="x", color="black", label="failed")
    ax.set_xlabel("trials (in start order)")
    ax.set_ylabel("validation accuracy / score")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def layer_breakdown(arch: Architecture, profile: str = DEFAULT_PROFILE) -> list[dict[str, Any]]:
    """Per layer: name, params, MACs (analytic cost) and predicted latency (ms) on `profile`."""

    lat = {l.index: l.latency_ms for l in analytic_latency(arch, profile).layers}
    return [{"name": l.name, "params": l.params, "macs": l.macs, "latency_ms": lat.get(l.index, 0.0)}
            for l in analytic_cost(arch).layers]


def layer_figure(arch: Architecture, profile: str = DEFAULT_PROFILE, title: str = ""):
    """Horizontal bars: params, MACs and predicted latency per layer of `arch`."""
    from matplotlib.ticker import EngFormatter, MaxNLocator

    rows = layer_breakdown(arch, profile)
    fig, axes = _figure(12, 0.9 + 0.32 * len(rows), ncols=3)
    names = [r["name"] for r in rows]
    y = np.arange(len(rows))
    for ax, (k, label, color) in zip(axes[0], (("params", "parameters", "#4c72b0"), ("macs", "MACs", "#55a868"),
                                               ("latency_ms", f"predicted latency on {profile} (ms)", "#c44e52"))):
        vals = [r[k] for r in rows]
        ax.barh(y, vals, color=color)
        ax.set_yticks(y, names if ax is axes[0][0] else [""] * len(rows), fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(4))
        if k != "latency_ms":
            ax.xaxis.set_major_formatter(EngFormatter())
        total = sum(vals)
        ax.set_title(f"total {total:,.4g}" if k == "latency_ms" else f"total {int(total):,d}", fontsize=8)
        ax.grid(True, axis="x", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
