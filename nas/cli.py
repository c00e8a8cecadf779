"""The `nas` command: parse arguments, validate, call one library function. Nothing else."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

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
    from search_spaces.catalog import SPACES

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
    from search_spaces.catalog import load_space

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
    p.add_argument("--space", required=True, help="a registered space name or a YAML file")
    p.add_argument("--arch", required=True, help="the architecture key")
    p.add_argument("--json", action="store_true")


@command("cost", "exact analytic cost of one architecture")(_cost_args)
def _cost(args):
    from evaluators.cost import analytic_cost
    from search_spaces.catalog import load_space

    arch = load_space(args.space).decode(args.arch)
    report = analytic_cost(arch)
    if args.json:
        print(json.dumps({"space": arch.space, "key": arch.key, **report.to_dict()}, indent=2))
        return
    print(f"{arch.space} {arch.key}: params {report.params:,d}  MACs {report.macs:,d}  "
          f"peak activations {report.activation_bytes:,d} B  weights fp32 {report.weight_bytes['fp32']:,d} B "
          f"int8 {report.weight_bytes['int8']:,d} B")
    for l in report.layers:
        print(f"  {l.index:3d} {l.name:<40} params {l.params:>10,d}  MACs {l.macs:>13,d}  out {l.output_shape}")


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
    try:
        return int(args.handler(args) or 0)
    except NasError as e:
        print(f"nas: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed
        return 0
    except KeyboardInterrupt:
        print("nas: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
