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
            return f"skip_c{self.out_channels}_s{self.stride}"
        parts = [self.block, f"k{self.kernel}"]
        if self.block == "mb":
            parts.append(f"e{_num(self.expansion)}")
        if self.se:
            parts.append(f"se{_num(self.se)}")
        parts += [self.act, f"c{self.out_channels}", f"s{self.stride}"]
        return "_".join(parts)


@dataclass(frozen=True)
class Head:
    channels: int
    act: str
    dropout: float


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
        d["layers"] = [asdict(layer) for layer in self.layers]
        return d

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Architecture":
        try:
            _check_keys(d, {f.name for f in fields(cls)}, "architecture")
            layers = []
            for i, raw in enumerate(d["layers"]):
                _check_keys(raw, {f.name for f in fields(Layer)}, f"architecture.layers[{i}]")
                layers.append(Layer(**raw))
            _check_keys(d["stem"], {f.name for f in fields(Stem)}, "architecture.stem")
            _check_keys(d["head"], {f.name for f in fields(Head)}, "architecture.head")
            arch = cls(
                space=d["space"], key=d["key"], resolution=d["resolution"],
                in_channels=d["in_channels"], num_classes=d["num_classes"],
                stem=Stem(**d["stem"]), layers=tuple(layers), head=Head(**d["head"]),
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
            prev = layer.out_channels

    def describe(self) -> list[str]:
        """Readable tokens: stem, one per layer, head."""
        toks = [f"stem_k{self.stem.kernel}_c{self.stem.channels}_s{self.stem.stride}_{self.stem.act}"]
        toks += [layer.token() for layer in self.layers]
        toks.append(f"head_c{self.head.channels}_{self.head.act}_d{_num(self.head.dropout)}")
        return toks


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _check_keys(d: Any, allowed: set[str], where: str) -> None:
    if not isinstance(d, dict):
        raise SpaceError(f"{where}: expected a mapping, got {type(d).__name__}")
    extra = set(d) - allowed
    if extra:
        raise SpaceError(f"{where}: unknown key '{sorted(extra)[0]}'; allowed: {', '.join(sorted(allowed))}")
