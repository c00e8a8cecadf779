"""The `nas` command: parse arguments, validate, call one library function. Nothing else."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Callable

from evaluators.cost import analytic_cost
from evaluators.energy import energy
from evaluators.hardware import PROFILES
from evaluators.calibrate import calibrate, validate
from evaluators.latency import latency_breakdown
from evaluators.lut import default_cache_path
from evaluators.quantize import WEIGHT_RANGE_CHOICES
from evaluators.timing import PRECISIONS as LUT_PRECISIONS
from nas.batched_search import run_supernet_search
from nas.compress import compress_options, run_compress
from nas.config import EXPORT_FORMATS, ExperimentConfig, ExportConfig, load_config
from nas.distill import run_distill
from nas.export import export_run
from nas.preflight import STAGES, preflight
from nas.report import write_report
from nas.specialize import parse_targets, run_specialize
from nas.supernet import evaluate_keys
from nas.rundir import (WINNERS, SearchInterrupted, enable_compilation_cache, read_architecture, read_distill,
                        read_winners)
from search_spaces.catalog import SPACES, load_space
from search_spaces.errors import NasError

Handler = Callable[[argparse.Namespace], int | None]
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Handler, str]] = {}


def command(name: str, help: str):
    """Register `nas NAME`: the decorated function adds arguments and returns the handler."""

    def wrap(setup):
        def deco(handler: Handler) -> Handler:
            if name in COMMANDS:
                raise RuntimeError(f"duplicate command {name}")
            COMMANDS[name] = (setup, handler, help)
            return handler

        return deco

    return wrap


# ----------------------------------------------------------------------- spaces
def _spaces_args(p):
    p.add_argument("--json", action="store_true")


@command("spaces", "list the registered search spaces with their sizes")(_spaces_args)
def _spaces(args):
    rows = [{"name": n, "size": SPACES.get(n).size(), "decisions": len(SPACES.get(n).decisions()),
             "description": SPACES.get(n).description} for n in SPACES]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        print(f"{r['name']:<16} {r['size']:>26,d} architectures  {r['decisions']:>3} decisions  {r['description']}")


def _space_args(p):
    p.add_argument("action", choices=["show"])
    p.add_argument("name", help="a registered space name or a YAML file")
    p.add_argument("--json", action="store_true")


@command("space", "show one search space: its decisions and options")(_space_args)
def _space(args):
    s = load_space(args.name)
    info = {
        "name": s.name, "description": s.description, "source": s.source, "size": s.size(),
        "input": {"resolution": list(s.resolutions), "channels": s.in_channels}, "num_classes": s.num_classes,
        "decisions": [{"name": d.name, "options": list(d.labels), "conditional": d.layer is not None}
                      for d in s.decisions()],
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"{s.name}: {s.description}\n  source: {s.source}\n  size: {s.size():,d} architectures\n"
          f"  input: {list(s.resolutions)} x {s.in_channels} ch, {s.num_classes} classes\n  decisions (key order):")
    for i, d in enumerate(info["decisions"]):
        opts = ", ".join(f"{j}={lab}" for j, lab in enumerate(d["options"]))
        print(f"    [{i:2d}] {d['name']:<14} {opts}{'  (inactive -> -)' if d['conditional'] else ''}")


def _cost_args(p):
    p.add_argument("--space", help="a registered space name or a YAML file")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--arch", help="the architecture key (with --space)")
    which.add_argument("--arch-file", help="an architecture.json (e.g. of a pruned model: widths outside the space)")
    p.add_argument("--json", action="store_true")


@command("cost", "exact analytic cost of one architecture")(_cost_args)
def _cost(args):
    if args.arch_file:
        arch = read_architecture(Path(args.arch_file))
    else:
        if not args.space:
            raise NasError("--space: required with --arch (or give --arch-file)")
        arch = load_space(args.space).decode(args.arch)
    report = analytic_cost(arch)
    latency = {p: latency_breakdown(arch, p) for p in PROFILES.names()}
    notes = {}
    for p in PROFILES.names():  # the measured int8 tables there are (latency_ms@PROFILE:int8)
        if default_cache_path(p, precision="int8").is_file():
            try:
                latency[f"{p}:int8"] = latency_breakdown(arch, p, precision="int8")
            except NasError as e:  # a table of another space: say so, cost the rest
                notes[f"{p}:int8"] = str(e)
    energies = {f"{p}:{q}": energy(arch, p, q).total_mj for p in PROFILES.names()
                if PROFILES.get(p).energy_pj is not None for q in PROFILES.get(p).precisions}
    if args.json:
        print(json.dumps({"space": arch.space, "key": arch.key, **report.to_dict(),
                          "latency_ms": {p: e.total_ms for p, e in latency.items()},
                          "latency_method": {p: e.method for p, e in latency.items()},
                          **({"latency_notes": notes} if notes else {}),
                          "energy_mj": energies}, indent=2))
        return
    print(f"{arch.space} {arch.key}: params {report.params:,d}  MACs {report.macs:,d}  "
          f"peak activations {report.activation_bytes:,d} B  weights fp32 {report.weight_bytes['fp32']:,d} B "
          f"int8 {report.weight_bytes['int8']:,d} B")
    print("  predicted latency (batch 1): " + "  ".join(f"{p} {e.total_ms:.3f} ms ({e.method})"
                                                        for p, e in latency.items()))
    for p, note in notes.items():
        print(f"  latency {p}: n/a ({note})")
    print("  energy per inference (batch 1): " + "  ".join(f"{k} {v:.4f} mJ" for k, v in energies.items()))
    for l in report.layers:
        print(f"  {l.index:3d} {l.name:<40} params {l.params:>10,d}  MACs {l.macs:>13,d}  out {l.output_shape}")


# ----------------------------------------------------------------------- hardware
def _hw_args(p):
    p.add_argument("action", choices=["profiles", "calibrate", "validate"])
    p.add_argument("--space", help="a registered space name or a YAML file")
    p.add_argument("--profile", default="host", help="hardware profile (calibration measures this machine: host)")
    p.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "jax"])
    p.add_argument("--n", type=int, default=50, help="validate: number of sampled architectures")
    p.add_argument("--cache", default=None, help="look-up table file (default under ~/.cache/compact-nas)")
    p.add_argument("--recalibrate", action="store_true", help="calibrate: measure again, ignoring the cache")
    p.add_argument("--precision", default="fp32", choices=list(LUT_PRECISIONS),
                   help="calibrate/validate: time layers at this precision (int8: ONNX Runtime QDQ models, a table "
                        "beside the fp32 one; the cost latency_ms@PROFILE:int8)")
    p.add_argument("--json", action="store_true")


@command("hw", "hardware profiles; calibrate and validate the latency look-up table")(_hw_args)
def _hw(args):
    if args.action == "profiles":
        rows = [PROFILES.get(n) for n in PROFILES.names()]
        for prof in rows:
            print(f"{prof.name:<14} {getattr(prof, 'description', '')}")
        return
    if not args.space:
        raise NasError(f"nas hw {args.action}: --space is required")

    def progress(done: int, total: int, what: str) -> None:
        if sys.stderr.isatty() or done == total or done % max(total // 10, 1) == 0:
            print(f"  [{done}/{total}] {what}", file=sys.stderr, flush=True)

    if args.action == "calibrate":
        table = calibrate(args.space, args.profile, args.runtime, cache_path=args.cache, progress=progress,
                          recalibrate=args.recalibrate, precision=args.precision)
        print(f"calibrated {len(table.entries)} layer configurations of {args.space} on {args.profile} "
              f"({args.runtime}, {table.precision}) -> {table.path}")
        return
    res = validate(args.space, args.profile, args.runtime, n=args.n, cache_path=args.cache,
                   progress=progress, precision=args.precision)
    if args.json:
        print(json.dumps(res, indent=2))
        return
    for method in ("analytic", "lut"):
        m = res[method]
        print(f"{method:>8}: Kendall tau {m['kendall_tau']:.3f}  Spearman {m['spearman']:.3f}  "
              f"MAPE {m['mape']:.1f}%  within 10%: {100 * m['within_10pct']:.0f}%")


# ----------------------------------------------------------------------- pipeline
def _search_args(p):
    p.add_argument("config", help="experiment YAML (see experiments/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dotted for nested keys), e.g. --set train.epochs=1")
    p.add_argument("--resume", action="store_true", help="continue an interrupted experiment")
    p.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    p.add_argument("--address", default=None, help="connect to a Ray cluster (auto, host:port, ray://host:10001)")


def _run_dir_args(p):
    p.add_argument("run_dir", help="the run directory written by `nas search`")


def _export_args(p):
    _run_dir_args(p)
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/export)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--winner", type=int, default=None, help="export only winner K (rank)")
    which.add_argument("--all", action="store_true", help="export every winner (the default)")
    p.add_argument("--format", default=None, help=f"comma-separated: {', '.join(EXPORT_FORMATS)} (default: the run's "
                   f"export.formats, else {','.join(ExportConfig().formats)})")
    p.add_argument("--int8", action="store_true", default=None,
                   help="also write model.int8.onnx (static QDQ, needs onnx; default: the run's export.int8)")
    p.add_argument("--calibration-images", type=int, default=None,
                   help=f"training images calibrating int8 (default: the run's export.calibration_images, else "
                        f"{ExportConfig().calibration_images})")
    p.add_argument("--int8-float-se", action="store_true", default=None,
                   help="keep squeeze-and-excite paths in float in model.int8.onnx: faster at batch 1, bigger file "
                        "(default: the run's export.int8_float_se)")
    p.add_argument("--int8-weight-range", default=None, choices=WEIGHT_RANGE_CHOICES,
                   help="int8 weights in [-127, 127] (full) or [-64, 64] (reduced: exact on x86-64 CPUs without VNNI); "
                        "auto: what this machine's CPU needs (default: the run's export.int8_weight_range, else full)")
    p.add_argument("--force", action="store_true", help="replace earlier model folders in the output folder")


def _compress_args(p):
    _run_dir_args(p)
    p.add_argument("--winner", type=int, default=None, help="compress only winner K (rank; default every winner)")
    p.add_argument("--prune", default=None, help="target: macs=F | params=F (F: fraction kept) | latency_ms@PROFILE=MS")
    p.add_argument("--criterion", default=None, help="channel importance: l1, bn (BatchNorm scale), taylor")
    p.add_argument("--steps", type=int, default=None, help="AGP pruning steps (1: one-shot)")
    p.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs in total (with KD from the teacher)")
    p.add_argument("--lowrank", nargs="?", const=True, default=None, metavar="TARGET",
                   help="low-rank factorization of 1x1 convs and the classifier after pruning: energy=F (default "
                        "energy=0.9: the fraction of squared singular values kept per layer), params=F or macs=F")
    p.add_argument("--lowrank-epochs", type=int, default=None, help="fine-tuning epochs after the factorization")
    p.add_argument("--divisor", type=int, default=None,
                   help="pruned widths and low-rank ranks are multiples of this (default 16; 1: any)")
    p.add_argument("--lowrank-keep", default=None, help="latency (default): keep a factorized layer only where "
                   "ONNX Runtime runs it faster at batch 1 and 32; cost: wherever it has fewer parameters")
    p.add_argument("--qat", action="store_true", help="quantization-aware training after pruning/factorization (adds model.int8.onnx)")
    p.add_argument("--int8-float-se", action="store_true", default=None,
                   help="with --qat: keep squeeze-and-excite paths in float in model.int8.onnx (faster at batch 1, "
                        "bigger file; default: the run's compress.int8_float_se)")
    p.add_argument("--int8-weight-range", default=None, choices=WEIGHT_RANGE_CHOICES,
                   help="with --qat: int8 weights in [-127, 127] (full) or [-64, 64] (reduced: exact on x86-64 CPUs "
                        "without VNNI); auto: what this machine's CPU needs (default: the run's "
                        "compress.int8_weight_range)")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/compressed)")
    p.add_argument("--force", action="store_true", help="replace an earlier result folder of the same name")


def _report_args(p):
    _run_dir_args(p)
    p.add_argument("--no-references", action="store_true",
                   help="skip training the hand-designed reference networks")


def _run_search(cfg: ExperimentConfig, args) -> Path:
    """The search of `cfg`: on Ray Tune, or driven in this process for `evaluator.kind: supernet` (without
    Ray, or scoring over `evaluator.workers` Ray actors)."""
    if cfg.evaluator.kind == "supernet" and not cfg.evaluator.workers:  # many candidates per call, no Ray
        return run_supernet_search(cfg, resume=args.resume, force=args.force)
    from nas.tune import run_search  # imported when used: importing Ray takes seconds, `nas spaces` should not

    return run_search(cfg, resume=args.resume, force=args.force, address=args.address)


@command("search", "run a search experiment on Ray Tune (or on a trained supernet)")(_search_args)
def _search(args):
    cfg = load_config(args.config, args.overrides)
    run_dir = _run_search(cfg, args)
    _print_winners(run_dir)


def _specialize_args(p):
    _run_dir_args(p)
    p.add_argument("--profile", action="append", default=[],
                   help="hardware profile to specialize for (repeatable; default: the experiment's specialize.targets)")
    p.add_argument("--all-profiles", action="store_true", help="every registered hardware profile")
    p.add_argument("--constraint", action="append", default=[], metavar="COST=MAX",
                   help="hard constraint, e.g. latency_ms@pixel4=3.0 (latency_ms=3.0: each profile's own latency)")
    p.add_argument("--budget", type=int, default=None, help="candidates predicted per profile")
    p.add_argument("--confirm", type=int, default=None, help="best predicted candidates measured on the supernet")
    p.add_argument("--measure", type=int, default=None, help="random candidates measured to fit the predictor (once)")
    _workers_args(p)


def _workers_args(p):
    p.add_argument("--workers", type=int, default=0,
                   help="Ray actors scoring on the supernet, each holding its weights once (0: in this process)")
    p.add_argument("--address", default=None, help="with --workers: the Ray cluster to join (auto, host:port, "
                   "ray://host:10001; default $RAY_ADDRESS, else a local Ray instance)")


def _open_scorer(args):
    """The run's supernet scorer over `--workers` Ray actors; None for 0 (scored in this process, no Ray)."""
    if not args.workers:
        return None
    from nas.tune.scoring import open_scorer  # imported when used: importing Ray takes seconds

    return open_scorer(args.run_dir, args.workers, n_images=getattr(args, "recalibration_images", None),
                       address=args.address)


def _closing(scorer):
    """Ends a scorer's Ray actors when the command is done (nothing for None)."""
    return contextlib.closing(scorer) if scorer is not None else contextlib.nullcontext()


@command("specialize", "pick the best supernet candidate per hardware profile, without training")(_specialize_args)
def _specialize(args):
    targets = None  # the experiment's specialize.targets
    if args.profile or args.all_profiles or args.constraint:
        targets = parse_targets(args.profile, args.constraint, all_profiles=args.all_profiles)
    with _closing(_open_scorer(args)) as scorer:
        run_specialize(args.run_dir, targets, effort={"budget": args.budget, "confirm": args.confirm,
                                                      "measure": args.measure}, scorer=scorer)


def _distill_args(p):
    _run_dir_args(p)
    p.add_argument("--seeds", type=int, default=None, help="seeds per winner and arm (default distill.seeds)")


@command("distill", "fine-tune the winners of a run with knowledge distillation, against a no-KD baseline")(
    _distill_args)
def _distill(args):
    run_distill(args.run_dir, seeds=args.seeds)


@command("export", "export the winners of a run")(_export_args)
def _export(args):
    export_run(args.run_dir, out=args.out, winner=args.winner,
               formats=tuple(args.format.split(",")) if args.format else None,
               force=args.force, int8=args.int8, calibration_images=args.calibration_images,
               int8_float_se=args.int8_float_se, int8_weight_range=args.int8_weight_range)


@command("compress", "prune a run's winners to a target and fine-tune them with distillation")(_compress_args)
def _compress(args):
    run_compress(args.run_dir, winner=args.winner, out=args.out, force=args.force,
                 options=compress_options(args.run_dir, prune=args.prune, criterion=args.criterion,
                                          steps=args.steps, epochs=args.epochs, lowrank=args.lowrank,
                                          lowrank_epochs=args.lowrank_epochs, lowrank_keep=args.lowrank_keep,
                                          divisor=args.divisor,
                                          qat=args.qat, int8_float_se=args.int8_float_se,
                                          int8_weight_range=args.int8_weight_range))


@command("report", "write report.md and plots for a finished run")(_report_args)
def _report(args):
    print(f"report: {write_report(args.run_dir, references=not args.no_references)}")


@command("run", "search, distill, compress (when compress.enabled) and export, in order")(_search_args)
def _run(args):
    cfg = load_config(args.config, args.overrides)
    preflight(cfg, STAGES)  # the later stages' files too, before the search spends its hours
    run_dir = _run_search(cfg, args)
    if cfg.distill.enabled:
        print("distillation:", flush=True)
        run_distill(run_dir)
    if cfg.compress is not None and cfg.compress.enabled:
        print("compression:", flush=True)
        run_compress(run_dir, force=True)
    export = cfg.export
    if export.enabled:
        print("export:", flush=True)
        export_run(run_dir, force=True, **export.run_kwargs())
    _print_winners(run_dir)


def _print_winners(run_dir) -> None:
    run_dir = Path(run_dir)
    report = read_distill(run_dir)
    distill = {r.rank: r for r in report.rows} if report else {}
    print(f"\nwinners ({run_dir / WINNERS}):")
    print(f"  {'rank':>4}  {'key':<20} {'params':>9} {'MACs':>11} {'val acc':>8} {'score':>7}"
          + ("  test acc: search / no-KD / KD (gain)" if distill else ""))
    for w in read_winners(run_dir):
        line = (f"  {w.rank:>4}  {w.key:<20} {w.params:>9,d} {w.macs:>11,d} "
                f"{w.val_accuracy:>8.4f} {w.score:>7.4f}")
        if w.rank in distill:
            d = distill[w.rank]
            line += f"  {d.before:.4f} / {d.baseline:.4f} / {d.after:.4f} ({d.gain:+.4f})"
        print(line)
    print(f"outputs: {run_dir} (trials.csv, winners.json, winners/, distill.json, export/)")


# ----------------------------------------------------------------------- supernet
def _supernet_args(p):
    sub = p.add_subparsers(dest="action", required=True)
    t = sub.add_parser("train", help="train the weight-sharing supernet of an experiment (one Ray Tune trial)")
    _search_args(t)
    e = sub.add_parser("eval", help="inherited validation accuracy of architecture keys on a trained supernet")
    _run_dir_args(e)
    e.add_argument("--arch", dest="keys", action="append", required=True, metavar="KEY",
                   help="an architecture key of the run's space (repeatable)")
    e.add_argument("--recalibration-images", type=int, default=None,
                   help="training images re-estimating BatchNorm per candidate (default: the supernet's config)")
    e.add_argument("--json", action="store_true")
    _workers_args(e)


@command("supernet", "train a weight-sharing supernet; score architectures on it")(_supernet_args)
def _supernet(args):
    if args.action == "train":
        from nas.tune.supernet import train_on_ray  # imported when used: importing Ray takes seconds

        cfg = load_config(args.config, args.overrides)
        out = train_on_ray(cfg, resume=args.resume, force=args.force, address=args.address)
        print(f"supernet: {out} (weights.msgpack, manifest.json, history.json, tensorboard/)")
        if cfg.specialize.targets:  # declared in the experiment: specialize right away
            print("specialization:", flush=True)
            run_specialize(cfg.run_dir)
        return
    if args.recalibration_images is not None and args.recalibration_images < 1:
        raise NasError(f"--recalibration-images: {args.recalibration_images}; allowed an integer >= 1")
    with _closing(_open_scorer(args)) as scorer:
        rows = evaluate_keys(args.run_dir, args.keys, n_images=args.recalibration_images, scorer=scorer)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        print(f"{r['key']}  {r['val_accuracy']:.4f}")


# ----------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nas", description="Neural architecture search for compact models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (setup, handler, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        setup(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    enable_compilation_cache()  # a command run again (or after a search) loads the programs it compiled
    try:
        return int(args.handler(args) or 0)
    except NasError as e:
        print(f"nas: error: {e}", file=sys.stderr)
        return 130 if isinstance(e, SearchInterrupted) else 2
    except BrokenPipeError:  # output piped into `head` and closed
        return 0
    except KeyboardInterrupt:
        print("nas: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
