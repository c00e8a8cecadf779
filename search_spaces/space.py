"""The search-space DSL: declare a space as data (YAML or dict), sample/enumerate/encode it.

A space is a list of *decisions* (categorical choices) in a fixed order: input resolution,
width multiplier, then per stage its output channels, its depth and one op choice per layer,
then the head width. Decisions with a single option are not decisions and take no place in
the key. The key has one character per decision (the option index in base 62) and '-' for a
layer decision that is inactive because its stage is shallower; that makes the key canonical:
every distinct choice assignment has exactly one key.

One module for the value and its declaration (about 460 lines): the parser at the bottom builds
exactly the `Op`/`Stage`/`SearchSpace` values above and nothing else, and `SearchSpace.from_dict`
calls it; apart, the two would import each other.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from search_spaces.architecture import ACTIVATIONS, BLOCKS, Architecture, Head, Layer, Stem
from search_spaces.errors import SpaceError, where

ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
INACTIVE = "-"
ENUMERATE_LIMIT = 2_000_000

# Which fields each block type accepts in an op declaration, and their defaults.
_OP_FIELDS: dict[str, dict[str, Any]] = {
    "ds": {"kernel": 3, "act": None},
    "mb": {"kernel": 3, "expansion": 6, "se": 0.0, "act": None},
    "skip": {},
}
_KERNELS = (1, 3, 5, 7, 9)


@dataclass(frozen=True)
class Op:
    """One concrete option of a layer decision."""

    block: str
    kernel: int = 0
    expansion: float = 1
    se: float = 0.0
    act: str = "relu"

    def label(self) -> str:
        if self.block == "skip":
            return "skip"
        s = f"{self.block}_k{self.kernel}"
        if self.block == "mb":
            s += f"_e{_num(self.expansion)}"
        if self.se:
            s += f"_se{_num(self.se)}"
        return s + f"_{self.act}"


@dataclass(frozen=True)
class Stage:
    stride: int
    channels: tuple[int, ...]
    depths: tuple[int, ...]
    layer_ops: tuple[tuple[Op, ...], ...]  # one option tuple per layer, len == max(depths)


@dataclass(frozen=True)
class Decision:
    """One categorical choice of the space; `stage`/`layer` set for conditional layer ops."""

    name: str
    options: tuple[Any, ...]
    labels: tuple[str, ...]
    stage: int | None = None
    layer: int | None = None


@dataclass(frozen=True)
class SearchSpace:
    """A declared search space. Build with `SearchSpace.from_dict` or `load_space`."""

    name: str
    in_channels: int
    num_classes: int
    resolutions: tuple[int, ...]
    width_mults: tuple[float, ...]
    stem: Stem
    stages: tuple[Stage, ...]
    head_channels: tuple[int, ...]
    head_act: str
    dropout: float
    divisor: int = 8
    description: str = ""
    source: str = "<python>"

    # ---------------------------------------------------------------- decisions
    def decisions(self) -> tuple[Decision, ...]:
        """All real decisions (>1 option) in key order."""
        out: list[Decision] = []

        def add(name, options, labels, stage=None, layer=None):
            if len(options) > 1:
                out.append(Decision(name, tuple(options), tuple(labels), stage, layer))

        add("resolution", self.resolutions, [str(r) for r in self.resolutions])
        add("width_mult", self.width_mults, [_num(w) for w in self.width_mults])
        for s, st in enumerate(self.stages):
            add(f"s{s}.channels", st.channels, [str(c) for c in st.channels])
            add(f"s{s}.depth", st.depths, [str(d) for d in st.depths])
            for li, ops in enumerate(st.layer_ops):
                conditional = li >= min(st.depths)  # only these layers can be inactive
                add(f"s{s}.l{li}.op", ops, [o.label() for o in ops], *((s, li) if conditional else ()))
        add("head.channels", self.head_channels, [str(c) for c in self.head_channels])
        return tuple(out)

    def size(self) -> int:
        """Exact number of distinct choice assignments (inactive layers do not multiply)."""
        n = len(self.resolutions) * len(self.width_mults) * len(self.head_channels)
        for st in self.stages:
            per_depth = sum(math.prod(len(ops) for ops in st.layer_ops[:d]) for d in st.depths)
            n *= len(st.channels) * per_depth
        return n

    # ---------------------------------------------------------------- choices <-> arch
    def _resolve(self, pick: Mapping[str, int], key: str) -> Architecture:
        def get(name: str, options: Sequence[Any]) -> Any:
            return options[pick.get(name, 0)] if len(options) > 1 else options[0]

        res = get("resolution", self.resolutions)
        width = get("width_mult", self.width_mults)
        stem_ch = self._scale(self.stem.channels, width)
        stem = Stem(self.stem.kernel, stem_ch, self.stem.stride, self.stem.act)
        layers: list[Layer] = []
        cin = stem_ch
        for s, st in enumerate(self.stages):
            cout = self._scale(get(f"s{s}.channels", st.channels), width)
            depth = get(f"s{s}.depth", st.depths)
            for li in range(depth):
                op = get(f"s{s}.l{li}.op", st.layer_ops[li])
                stride = st.stride if li == 0 else 1
                if op.block == "skip":
                    layers.append(Layer("skip", cin, cout, stride, act=op.act))
                else:
                    layers.append(Layer(op.block, cin, cout, stride, op.kernel, op.expansion, op.se, op.act))
                cin = cout
        head = Head(get("head.channels", self.head_channels), self.head_act, self.dropout)
        return Architecture(self.name, key, res, self.in_channels, self.num_classes, stem, tuple(layers), head)

    def _scale(self, channels: int, width: float) -> int:
        return channels if width == 1 else make_divisible(channels * width, self.divisor)

    def _active(self, d: Decision, pick: Mapping[str, int]) -> bool:
        if d.layer is None:
            return True
        depths = self.stages[d.stage].depths
        depth = depths[pick.get(f"s{d.stage}.depth", 0)] if len(depths) > 1 else depths[0]
        return d.layer < depth

    def from_choices(self, choices: Mapping[str, Any]) -> Architecture:
        """Architecture from a decision-name -> option-index mapping (a Ray Tune config).

        Choices of inactive layers are ignored (canonicalised), so a flat sample of every
        decision always maps to a valid architecture. Missing decisions are an error.
        """
        pick: dict[str, int] = {}
        for d in self.decisions():
            if d.name not in choices:
                raise SpaceError(f"space '{self.name}': config lacks decision '{d.name}'")
            idx = choices[d.name]
            if isinstance(idx, (bool, np.bool_)) or not isinstance(idx, (int, np.integer)) or not 0 <= idx < len(d.options):
                raise SpaceError(f"space '{self.name}': decision '{d.name}' = {idx!r}, allowed 0..{len(d.options) - 1}")
            pick[d.name] = int(idx)
        return self.decode(self._key(pick))

    def to_choices(self, arch: Architecture) -> dict[str, int]:
        """Decision-name -> option index (inactive layers get 0) for `arch` of this space."""
        out = {}
        for d, ch in zip(self.decisions(), self._check_key(arch.key)):
            out[d.name] = 0 if ch == INACTIVE else ALPHABET.index(ch)
        return out

    def _key(self, pick: Mapping[str, int]) -> str:
        return "".join(
            ALPHABET[pick[d.name]] if self._active(d, pick) else INACTIVE for d in self.decisions()
        )

    def _check_key(self, key: str) -> str:
        decisions = self.decisions()
        if not isinstance(key, str) or len(key) != len(decisions):
            raise SpaceError(
                f"arch key {key!r} for space '{self.name}': expected {len(decisions)} characters "
                f"(one per decision: {', '.join(d.name for d in decisions) or 'none'})"
            )
        return key

    def decode(self, key: str) -> Architecture:
        """Key -> Architecture; rejects any non-canonical or malformed key with a clear message."""
        self._check_key(key)
        pick: dict[str, int] = {}
        decisions = self.decisions()
        for pos, (d, ch) in enumerate(zip(decisions, key)):
            if ch == INACTIVE:
                continue
            idx = ALPHABET.find(ch)
            if idx < 0 or idx >= len(d.options):
                raise SpaceError(
                    f"arch key {key!r} for space '{self.name}': position {pos} ({d.name}) is {ch!r}, "
                    f"allowed {_allowed(len(d.options))}"
                )
            pick[d.name] = idx
        for pos, (d, ch) in enumerate(zip(decisions, key)):
            active = self._active(d, pick)
            if d.name not in pick and active:
                raise SpaceError(
                    f"arch key {key!r} for space '{self.name}': position {pos} ({d.name}) is '-' but the layer "
                    f"is active; allowed {_allowed(len(d.options))}"
                )
            if d.name in pick and not active:
                raise SpaceError(
                    f"arch key {key!r} for space '{self.name}': position {pos} ({d.name}) must be '-' "
                    f"because its stage is shallower"
                )
        return self._resolve(pick, key)

    def encode(self, arch: Architecture) -> str:
        """Architecture -> key (checks the architecture really belongs to this space)."""
        if arch.space != self.name:
            raise SpaceError(f"architecture of space '{arch.space}' cannot be encoded in space '{self.name}'")
        if self.decode(arch.key) != arch:
            raise SpaceError(f"architecture with key {arch.key!r} does not match space '{self.name}'")
        return arch.key

    # ---------------------------------------------------------------- sampling
    def sample(self, rng: np.random.Generator) -> Architecture:
        """Uniform choice per decision (inactive layers canonicalised)."""
        pick = {d.name: int(rng.integers(len(d.options))) for d in self.decisions()}
        return self.decode(self._key(pick))

    def enumerate(self, limit: int = ENUMERATE_LIMIT) -> Iterator[Architecture]:
        """Every distinct architecture, in key order. Refuses spaces larger than `limit`."""
        if self.size() > limit:
            raise SpaceError(f"space '{self.name}' has {self.size()} architectures; enumerate() allows at most {limit}")
        for key in self.keys():
            yield self.decode(key)

    def keys(self) -> Iterator[str]:
        """Every canonical key, in order, without building architectures."""
        decisions = self.decisions()
        seen: set[str] = set()
        for combo in itertools.product(*(range(len(d.options)) for d in decisions)):
            key = self._key({d.name: i for d, i in zip(decisions, combo)})
            if key not in seen:  # inactive layers collapse several combos into one key
                seen.add(key)
                yield key

    def to_param_space(self, choice: Callable[[list[int]], Any] = list) -> dict[str, Any]:
        """A flat Ray Tune `param_space`: one categorical per decision over option indices.

        Pass `ray.tune.choice` as `choice` (kept as an argument so this floor never imports Ray).
        Inactive layers are sampled too and ignored by `from_choices`.
        """
        return {d.name: choice(list(range(len(d.options)))) for d in self.decisions()}

    def with_input(self, resolution: int | None = None, in_channels: int | None = None,
                   num_classes: int | None = None) -> "SearchSpace":
        """The same space for another input size / channel count / class count."""
        d = dict(self.__dict__)
        if resolution is not None:
            d["resolutions"] = (int(resolution),)
        if in_channels is not None:
            d["in_channels"] = int(in_channels)
        if num_classes is not None:
            d["num_classes"] = int(num_classes)
        space = SearchSpace(**d)
        space.check()
        return space

    # ---------------------------------------------------------------- validation
    def check(self) -> None:
        """Space-level invariants (strides vs resolution, >=1 layer)."""
        total = self.stem.stride * math.prod(st.stride for st in self.stages)
        for r in self.resolutions:
            if r < total:
                raise SpaceError(
                    f"{where(self.source, 'input.resolution')}: {r} is too small for a total stride of {total}; "
                    f"allowed >= {total}"
                )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<python>") -> "SearchSpace":
        """Parse and validate a declaration (the YAML document as a dict)."""
        return _parse(d, source)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of `divisor`, never going below 90% (MobileNet convention)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _allowed(n: int) -> str:
    return f"'0'..'{ALPHABET[n - 1]}'" if n > 1 else "'0'"


# ==================================================================== parsing
_TOP = {"name", "description", "input", "num_classes", "width_mult", "stem", "stages", "head", "divisor"}


def _keys(d: Any, allowed: set[str], src: str, path: str) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise SpaceError(f"{where(src, path)}: expected a mapping, got {type(d).__name__}")
    for k in d:
        if k not in allowed:
            raise SpaceError(f"{where(src, f'{path}.{k}' if path else str(k))}: unknown key; allowed: {', '.join(sorted(allowed))}")
    return d


def _req(d: Mapping[str, Any], k: str, src: str, path: str) -> Any:
    if k not in d:
        raise SpaceError(f"{where(src, f'{path}.{k}' if path else k)}: required key is missing")
    return d[k]


def _choices(v: Any, src: str, path: str, kind: type, check: Callable[[Any], bool], allowed: str) -> tuple:
    vals = list(v) if isinstance(v, (list, tuple)) else [v]
    if not vals:
        raise SpaceError(f"{where(src, path)}: empty choice list; give at least one value ({allowed})")
    out = []
    for x in vals:
        ok = isinstance(x, kind) and not isinstance(x, bool) if kind is not float else (
            isinstance(x, (int, float)) and not isinstance(x, bool))
        if kind is str:
            ok = isinstance(x, str)
        if not ok or not check(x):
            raise SpaceError(f"{where(src, path)}: invalid value {x!r}; allowed {allowed}")
        out.append(x)
    if len(set(out)) != len(out):
        raise SpaceError(f"{where(src, path)}: duplicate values in {out}")
    return tuple(out)


def _positive_ints(v, src, path):
    return _choices(v, src, path, int, lambda x: x > 0, "positive integers")


def _stride(v, src, path) -> int:
    if v not in (1, 2) or isinstance(v, bool):
        raise SpaceError(f"{where(src, path)}: invalid stride {v!r}; allowed 1 or 2")
    return v


def _act(v, src, path) -> tuple[str, ...]:
    return _choices(v, src, path, str, lambda x: x in ACTIVATIONS, f"one of {', '.join(ACTIVATIONS)}")


def _parse_ops(raw: Any, default_act: str, src: str, path: str) -> tuple[Op, ...]:
    if not isinstance(raw, list) or not raw:
        raise SpaceError(f"{where(src, path)}: expected a non-empty list of ops ({{block: ds|mb|skip, ...}})")
    ops: list[Op] = []
    for i, o in enumerate(raw):
        p = f"{path}[{i}]"
        if not isinstance(o, Mapping):
            raise SpaceError(f"{where(src, p)}: expected a mapping like {{block: mb, kernel: 3}}")
        block = o.get("block")
        if block not in BLOCKS:
            raise SpaceError(f"{where(src, p + '.block')}: unknown block type {block!r}; allowed: {', '.join(BLOCKS)}")
        fields = _OP_FIELDS[block]
        _keys(o, {"block", *fields}, src, p)
        if block == "skip":
            ops.append(Op("skip", act=default_act))
            continue
        kernels = _choices(o.get("kernel", fields["kernel"]), src, p + ".kernel", int,
                           lambda x: x in _KERNELS, f"odd kernel sizes {list(_KERNELS)}")
        acts = _act(o.get("act", default_act), src, p + ".act")
        if block == "ds":
            ops += [Op("ds", k, 1, 0.0, a) for k in kernels for a in acts]
            continue
        exps = _choices(o.get("expansion", fields["expansion"]), src, p + ".expansion", float,
                        lambda x: x >= 1, "numbers >= 1")
        ses = _choices(o.get("se", fields["se"]), src, p + ".se", float,
                       lambda x: 0 <= x <= 1, "ratios in [0, 1] (0 = no squeeze-and-excite)")
        ops += [Op("mb", k, e, s, a) for k in kernels for e in exps for s in ses for a in acts]
    if len(set(ops)) != len(ops):
        raise SpaceError(f"{where(src, path)}: the same op is declared twice")
    if len(ops) > len(ALPHABET):
        raise SpaceError(f"{where(src, path)}: {len(ops)} options; a decision allows at most {len(ALPHABET)}")
    return tuple(ops)


def _parse(d: Mapping[str, Any], src: str) -> SearchSpace:
    _keys(d, _TOP, src, "")
    name = _req(d, "name", src, "")
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        raise SpaceError(f"{where(src, 'name')}: invalid name {name!r}; allowed letters, digits, '_' and '-'")
    inp = _keys(_req(d, "input", src, ""), {"resolution", "channels"}, src, "input")
    resolutions = _positive_ints(_req(inp, "resolution", src, "input"), src, "input.resolution")
    in_ch = _positive_ints(_req(inp, "channels", src, "input"), src, "input.channels")
    num_classes = _positive_ints(_req(d, "num_classes", src, ""), src, "num_classes")
    if len(in_ch) != 1 or len(num_classes) != 1:
        raise SpaceError(f"{where(src, 'input.channels/num_classes')}: must be a single value, not a choice")
    widths = _choices(d.get("width_mult", 1.0), src, "width_mult", float, lambda x: x > 0, "positive numbers")
    divisor = _positive_ints(d.get("divisor", 8), src, "divisor")[0]

    st = _keys(_req(d, "stem", src, ""), {"kernel", "channels", "stride", "act"}, src, "stem")
    stem_k = _choices(st.get("kernel", 3), src, "stem.kernel", int, lambda x: x in _KERNELS, f"{list(_KERNELS)}")
    stem_c = _positive_ints(_req(st, "channels", src, "stem"), src, "stem.channels")
    stem_a = _act(st.get("act", "relu"), src, "stem.act")
    if len(stem_k) + len(stem_c) + len(stem_a) != 3:
        raise SpaceError(f"{where(src, 'stem')}: stem fields take a single value, not a choice")
    stem = Stem(stem_k[0], stem_c[0], _stride(st.get("stride", 1), src, "stem.stride"), stem_a[0])

    raw_stages = _req(d, "stages", src, "")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise SpaceError(f"{where(src, 'stages')}: expected a non-empty list of stages")
    stages = []
    for i, s in enumerate(raw_stages):
        p = f"stages[{i}]"
        _keys(s, {"stride", "channels", "depth", "ops", "layers", "act"}, src, p)
        stride = _stride(_req(s, "stride", src, p), src, p + ".stride")
        channels = _positive_ints(_req(s, "channels", src, p), src, p + ".channels")
        act = s.get("act", "relu")
        _act(act, src, p + ".act")
        if ("ops" in s) == ("layers" in s):
            raise SpaceError(f"{where(src, p)}: give exactly one of 'ops' (with 'depth') or 'layers' (a fixed list)")
        if "ops" in s:
            depths = _positive_ints(_req(s, "depth", src, p), src, p + ".depth")
            ops = _parse_ops(s["ops"], act, src, p + ".ops")
            layer_ops = tuple(ops for _ in range(max(depths)))
        else:
            layers = s["layers"]
            if not isinstance(layers, list) or not layers:
                raise SpaceError(f"{where(src, p + '.layers')}: expected a non-empty list of {{ops: [...]}}")
            layer_ops = tuple(
                _parse_ops(_req(_keys(ly, {"ops"}, src, f"{p}.layers[{j}]"), "ops", src, f"{p}.layers[{j}]"),
                           act, src, f"{p}.layers[{j}].ops")
                for j, ly in enumerate(layers)
            )
            depths = _positive_ints(s.get("depth", len(layers)), src, p + ".depth")
            if max(depths) > len(layers):
                raise SpaceError(f"{where(src, p + '.depth')}: {max(depths)} exceeds the {len(layers)} declared layers")
        stages.append(Stage(stride, channels, depths, layer_ops))

    hd = _keys(_req(d, "head", src, ""), {"channels", "act", "dropout"}, src, "head")
    head_c = _positive_ints(_req(hd, "channels", src, "head"), src, "head.channels")
    head_a = _act(hd.get("act", "relu"), src, "head.act")
    dropout = hd.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise SpaceError(f"{where(src, 'head.dropout')}: invalid value {dropout!r}; allowed a number in [0, 1)")
    if len(head_a) != 1:
        raise SpaceError(f"{where(src, 'head.act')}: must be a single value, not a choice")
    space = SearchSpace(
        name=name, in_channels=in_ch[0], num_classes=num_classes[0], resolutions=resolutions,
        width_mults=widths, stem=stem, stages=tuple(stages), head_channels=head_c, head_act=head_a[0],
        dropout=float(dropout), divisor=divisor, description=str(d.get("description", "")), source=src,
    )
    space.check()
    return space
