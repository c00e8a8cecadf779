"""Architecture: a fully resolved sample of a search space, as an immutable value.

An `Architecture` carries both its genotype (the space name and the compact choice key)
and its phenotype (input, stem, one `Layer` per active layer, head), so everything
downstream (model builder, cost model, export) needs only the value itself, never the space.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from search_spaces.errors import SpaceError

BLOCKS = ("ds", "mb", "skip")
ACTIVATIONS = ("relu", "relu6", "hswish")
# Low-rank factorized 1x1 convs of a layer (names from `Layer.conv_shapes`; the head's are 'conv' and
# 'classifier'), in that order: ((name, rank), ...); () = none factorized.
Ranks = tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Stem:
    kernel: int
    channels: int
    stride: int
    act: str


@dataclass(frozen=True)
class Layer:
    """One block. `kernel`, `expansion`, `se` are 0/1/0 where the block type has none."""

    block: str
    in_channels: int
    out_channels: int
    stride: int
    kernel: int = 0
    expansion: float = 1
    se: float = 0.0
    act: str = "relu"
    ranks: Ranks = ()  # low-rank factorized 1x1 convs (evaluators.lowrank); omitted from JSON when empty

    def rank(self, name: str) -> int | None:
        """The rank of conv `name` when it is factorized (x @ down[cin, r] @ up[r, cout]), else None."""
        return dict(self.ranks).get(name)

    def conv_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) channels of each 1x1 conv this block has (the ones `ranks` may name)."""
        if self.block == "mb":
            shapes = {"project": (self.expanded_channels, self.out_channels)}
            if self.expanded_channels != self.in_channels:
                shapes = {"expand": (self.in_channels, self.expanded_channels), **shapes}
            return shapes
        if self.block == "ds":
            return {"pw": (self.in_channels, self.out_channels)}
        return {} if self.residual else {"shortcut": (self.in_channels, self.out_channels)}

    @property
    def expanded_channels(self) -> int:
        """Channels after the 1x1 expansion of an `mb` block (= in_channels otherwise)."""
        if self.block != "mb":
            return self.in_channels
        return int(round(self.in_channels * self.expansion))

    @property
    def se_channels(self) -> int:
        """Squeeze-and-excite bottleneck width: in_channels * se (MnasNet convention), >= 1."""
        return max(1, int(self.in_channels * self.se)) if self.se > 0 else 0

    @property
    def residual(self) -> bool:
        """True when the block adds its input to its output (identity shortcut)."""
        same = self.stride == 1 and self.in_channels == self.out_channels
        return same and self.block in ("mb", "skip")

    def token(self) -> str:
        """A readable timm-style token, e.g. 'mb_k5_e6_se0.25_relu6_c64_s2'."""
        if self.block == "skip":
            return f"skip_c{self.out_channels}_s{self.stride}" + ranks_token(self.ranks)
        parts = [self.block, f"k{self.kernel}"]
        if self.block == "mb":
            parts.append(f"e{_num(self.expansion)}")
        if self.se:
            parts.append(f"se{_num(self.se)}")
        parts += [self.act, f"c{self.out_channels}", f"s{self.stride}"]
        return "_".join(parts) + ranks_token(self.ranks)


@dataclass(frozen=True)
class Head:
    channels: int
    act: str
    dropout: float
    ranks: Ranks = ()  # low-rank factorized 'conv' (the 1x1 head conv) / 'classifier'; omitted from JSON when empty

    def rank(self, name: str) -> int | None:
        return dict(self.ranks).get(name)


@dataclass(frozen=True)
class Architecture:
    """A resolved network: hashable, comparable, with a compact `key` and a JSON form."""

    space: str
    key: str
    resolution: int
    in_channels: int
    num_classes: int
    stem: Stem
    layers: tuple[Layer, ...]
    head: Head

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [_ranks_out(asdict(layer)) for layer in self.layers]
        d["head"] = _ranks_out(d["head"])
        return d

    @property
    def factorized(self) -> bool:
        """True when some 1x1 conv or the classifier is low-rank factorized."""
        return bool(self.head.ranks) or any(layer.ranks for layer in self.layers)

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Architecture":
        try:
            _check_keys(d, {f.name for f in fields(cls)}, "architecture")
            layers = []
            for i, raw in enumerate(d["layers"]):
                _check_keys(raw, {f.name for f in fields(Layer)}, f"architecture.layers[{i}]")
                layers.append(Layer(**_ranks_in(raw, f"architecture.layers[{i}]")))
            _check_keys(d["stem"], {f.name for f in fields(Stem)}, "architecture.stem")
            _check_keys(d["head"], {f.name for f in fields(Head)}, "architecture.head")
            arch = cls(
                space=d["space"], key=d["key"], resolution=d["resolution"],
                in_channels=d["in_channels"], num_classes=d["num_classes"],
                stem=Stem(**d["stem"]), layers=tuple(layers), head=Head(**_ranks_in(d["head"], "architecture.head")),
            )
        except (KeyError, TypeError) as e:
            raise SpaceError(f"architecture JSON: missing or malformed field {e}") from None
        arch.validate()
        return arch

    @classmethod
    def from_json(cls, text: str) -> "Architecture":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise SpaceError(f"architecture JSON: not valid JSON ({e.msg} at line {e.lineno})") from None

    def validate(self) -> None:
        """Check the structural invariants every consumer relies on."""
        prev = self.stem.channels
        for i, layer in enumerate(self.layers):
            if layer.block not in BLOCKS:
                raise SpaceError(f"architecture.layers[{i}].block: '{layer.block}' not in {list(BLOCKS)}")
            if layer.in_channels != prev:
                raise SpaceError(f"architecture.layers[{i}].in_channels: {layer.in_channels} != previous output {prev}")
            if layer.stride not in (1, 2):
                raise SpaceError(f"architecture.layers[{i}].stride: {layer.stride}, allowed 1 or 2")
            _check_ranks(layer.ranks, layer.conv_shapes(), f"architecture.layers[{i}].ranks")
            prev = layer.out_channels
        _check_ranks(self.head.ranks, {"conv": (prev, self.head.channels),
                                       "classifier": (self.head.channels, self.num_classes)}, "architecture.head.ranks")

    def describe(self) -> list[str]:
        """Readable tokens: stem, one per layer, head."""
        toks = [f"stem_k{self.stem.kernel}_c{self.stem.channels}_s{self.stem.stride}_{self.stem.act}"]
        toks += [layer.token() for layer in self.layers]
        toks.append(f"head_c{self.head.channels}_{self.head.act}_d{_num(self.head.dropout)}" + ranks_token(self.head.ranks))
        return toks


def ranks_token(ranks: Ranks) -> str:
    """'' or e.g. '_lr-expand8-project12': the suffix naming a layer's factorized convs and ranks."""
    return "_lr" + "".join(f"-{name}{r}" for name, r in ranks) if ranks else ""


def _ranks_out(d: dict[str, Any]) -> dict[str, Any]:
    """The JSON form of a layer/head: `ranks` as {name: rank}, left out when empty (so an
    unfactorized architecture's JSON is what it was before ranks existed)."""
    ranks = d.pop("ranks", ())
    if ranks:
        d["ranks"] = {name: r for name, r in ranks}
    return d


def _ranks_in(raw: dict[str, Any], where: str) -> dict[str, Any]:
    if "ranks" not in raw:
        return raw
    ranks = raw["ranks"]
    if not isinstance(ranks, dict):
        raise SpaceError(f"{where}.ranks: expected a mapping of conv name to rank, got {ranks!r}")
    return {**raw, "ranks": tuple((str(k), v) for k, v in ranks.items())}


def _check_ranks(ranks: Ranks, shapes: dict[str, tuple[int, int]], where: str) -> None:
    """Each named conv exists, appears once, in the canonical order, with 1 <= rank <= min(in, out)."""
    names = [n for n, _ in ranks]
    for name, r in ranks:
        if name not in shapes:
            raise SpaceError(f"{where}: unknown conv '{name}'; allowed: {', '.join(shapes) or 'none (no 1x1 conv)'}")
        cin, cout = shapes[name]
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(cin, cout):
            raise SpaceError(f"{where}.{name}: rank {r!r}; allowed an integer in [1, {min(cin, cout)}]")
    if names != [n for n in shapes if n in names]:
        raise SpaceError(f"{where}: {names} repeats a conv or is out of order; allowed order: {', '.join(shapes)}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _check_keys(d: Any, allowed: set[str], where: str) -> None:
    if not isinstance(d, dict):
        raise SpaceError(f"{where}: expected a mapping, got {type(d).__name__}")
    extra = set(d) - allowed
    if extra:
        raise SpaceError(f"{where}: unknown key '{sorted(extra)[0]}'; allowed: {', '.join(sorted(allowed))}")
