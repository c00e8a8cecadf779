"""A weight-sharing supernet for any declared space: one Flax module, every candidate as arrays.

`Supernet(space)` holds the largest choice of every decision: per layer slot (stage s, layer l)
separate weights per block type (`ds`, `mb`, the 1x1 `skip` shortcut), each at the largest
channel count, expansion, kernel and squeeze-and-excite width the space allows. A candidate is an
`Architecture` of that space turned into ARRAYS by `candidate(space, arch)`:

  channel masks    the first c channels of the stem, each stage, each expansion, SE and head
  kernel masks     a k x k window of the largest depthwise kernel (the window a SAME-padded k x k
                   convolution reads at that layer's input size: its centre, bar one corner case)
  branch           per slot, the index of (block, activation) under `lax.switch`: 'off' (a layer
                   beyond the candidate's depth, the identity), 'ds', 'mb', 'mb' without expansion,
                   'skip' identity, 'skip' shortcut; only the taken branch runs under `jit`
  residual, se_on  0/1 flags

So one compiled program serves every candidate of a space at one input resolution. `extract`
slices the stand-alone variables of one candidate for `search_spaces.model.build_model(arch)`,
which computes the same function (tests/test_supernet.py).

Channels are shared first-c; `channel_groups` lists every tensor axis that carries one shared set
of channels, so the trainer can re-order them by importance (`permute_channels`) without changing
the largest candidate's function.
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass
from typing import Any, Mapping

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from search_spaces.architecture import Architecture, Layer
from search_spaces.errors import SpaceError
from search_spaces.model import ACT_FNS, BN_EPS, CONV_INIT
from search_spaces.ops import KERNELS, batch_norm_train, same_padding
from search_spaces.space import SearchSpace

Candidate = dict[str, Any]  # a pytree of NumPy arrays (see `candidate`)
_BLOCK_RANK = {"skip": 0, "ds": 1, "mb": 2}


# ==================================================================== static structure
@dataclass(frozen=True)
class Slot:
    """One layer position of the supernet (stage `stage`, layer `index`) at its largest."""

    name: str
    stage: int
    index: int
    stride: int
    cin: int  # largest input channels
    cout: int  # largest output channels
    ds_kernel: int  # largest ds kernel (0: no ds op here)
    mb_kernel: int  # largest mb kernel (0: no mb op here)
    expanded: int  # largest mb expanded width (0: no mb op)
    se: int  # largest SE width (0: no SE op)
    shortcut: bool  # a skip op may need its 1x1 shortcut (stride 2 or cin != cout)
    branches: tuple[tuple[str, str], ...]  # (kind, act): off | ds | mb | mb_noexp | skip_id | skip_conv


@dataclass(frozen=True)
class Layout:
    """The supernet's static shape: stem, slots, head widths at their largest."""

    stem: int
    stages: tuple[int, ...]  # largest output channels per stage
    slots: tuple[Slot, ...]
    head: int


def _scaled(space: SearchSpace, channels: int) -> set[int]:
    return {space._scale(channels, w) for w in space.width_mults}


def _stage_widths(space: SearchSpace, s: int) -> set[int]:
    return {space._scale(c, w) for c in space.stages[s].channels for w in space.width_mults}


def _expanded(cin: int, e: float) -> int:
    return Layer("mb", cin, cin, 1, 3, e).expanded_channels


def _se_width(cin: int, se: float) -> int:
    return Layer("mb", cin, cin, 1, 3, 2, se).se_channels


@functools.lru_cache(maxsize=32)
def layout(space: SearchSpace) -> Layout:
    """The supernet's slots and largest widths for `space` (cached; spaces are hashable values)."""
    slots = []
    stem_w = _scaled(space, space.stem.channels)
    for s, st in enumerate(space.stages):
        cur = _stage_widths(space, s)
        for li, ops in enumerate(st.layer_ops):
            stride = st.stride if li == 0 else 1
            # (cin, cout) pairs one candidate can have: one width multiplier scales both
            if li > 0:
                pairs = {(c, c) for c in cur}
            else:
                before = space.stages[s - 1].channels if s > 0 else (space.stem.channels,)
                pairs = {(space._scale(a, w), space._scale(c, w))
                         for w in space.width_mults for a in before for c in st.channels}
            ins = {a for a, _ in pairs}
            ds = [o for o in ops if o.block == "ds"]
            mb = [o for o in ops if o.block == "mb"]
            skip = [o for o in ops if o.block == "skip"]
            branches: list[tuple[str, str]] = []
            if li >= min(st.depths):
                branches.append(("off", ""))
            for a in dict.fromkeys(o.act for o in ds):
                branches.append(("ds", a))
            for a in dict.fromkeys(o.act for o in mb):
                exps = {(cin, o.expansion) for o in mb if o.act == a for cin in ins}
                if any(_expanded(c, e) != c for c, e in exps):
                    branches.append(("mb", a))
                if any(_expanded(c, e) == c for c, e in exps):
                    branches.append(("mb_noexp", a))
            identity = stride == 1 and any(a == b for a, b in pairs)
            shortcut = bool(skip) and (stride != 1 or any(a != b for a, b in pairs))
            if skip and identity:
                branches.append(("skip_id", ""))
            if shortcut:
                branches.append(("skip_conv", ""))
            cin_max, cout_max = max(ins), max(cur)
            slots.append(Slot(
                name=f"s{s}_l{li}", stage=s, index=li, stride=stride, cin=cin_max, cout=cout_max,
                ds_kernel=max((o.kernel for o in ds), default=0), mb_kernel=max((o.kernel for o in mb), default=0),
                expanded=max((_expanded(cin_max, o.expansion) for o in mb), default=0),
                se=max((_se_width(cin_max, o.se) for o in mb), default=0),
                shortcut=shortcut, branches=tuple(branches)))
    return Layout(max(stem_w), tuple(max(_stage_widths(space, s)) for s in range(len(space.stages))),
                  tuple(slots), max(space.head_channels))


def _input_sizes(space: SearchSpace, resolution: int) -> list[int]:
    """Feature-map size at each slot's input, in slot order."""
    size = same_padding(resolution, space.stem.kernel, space.stem.stride)[0]
    out = []
    for st in space.stages:
        for li in range(len(st.layer_ops)):
            out.append(size)
            if li == 0:
                size = -(-size // st.stride)
    return out


def kernel_window(size: int, kernel: int, largest: int, stride: int) -> int:
    """Offset of the k x k window of a largest x largest kernel that computes a SAME k x k convolution
    on a `size` map: before(largest) - before(k) of the SAME paddings (the centre, (K - k) / 2, except
    where SAME padding is clipped at zero)."""
    off = same_padding(size, largest, stride)[1] - same_padding(size, kernel, stride)[1]
    if not 0 <= off <= largest - kernel:
        raise SpaceError(f"kernel {kernel} has no window in a {largest}x{largest} kernel at input size {size}")
    return off


# ==================================================================== candidates as arrays
def _mask(n: int, active: int) -> np.ndarray:
    return (np.arange(n) < active).astype(np.float32)


def _slots_of(space: SearchSpace, arch: Architecture) -> list[Layer | None]:
    """The architecture's layer in each slot (None where the stage is shallower)."""
    choices = space.to_choices(arch)
    layers = iter(arch.layers)
    out: list[Layer | None] = []
    for s, st in enumerate(space.stages):
        depth = st.depths[choices.get(f"s{s}.depth", 0)]
        out += [next(layers) if li < depth else None for li in range(len(st.layer_ops))]
    return out


def check_arch(space: SearchSpace, arch: Architecture) -> None:
    """Raise a one-line `SpaceError` unless `arch` is an architecture of `space`."""
    if not isinstance(arch, Architecture):
        raise SpaceError(f"expected an Architecture of space '{space.name}', got {type(arch).__name__}")
    if arch.space != space.name:
        raise SpaceError(f"architecture '{arch.key}' is of space '{arch.space}', not of the supernet's space "
                         f"'{space.name}'")
    try:
        same = space.decode(arch.key) == arch
    except SpaceError as e:
        raise SpaceError(f"architecture '{arch.key}' is not of the supernet's space '{space.name}' ({e})") from None
    if not same:
        raise SpaceError(f"architecture '{arch.key}' does not match space '{space.name}' (another input size or "
                         f"declaration?)")


def candidate(space: SearchSpace, arch: Architecture) -> Candidate:
    """`arch` (an Architecture of `space`) as the arrays `Supernet.__call__` takes.

    Returns a dict: 'stem', 'head' (channel masks), 'stages' (a tuple of channel masks), and per slot
    name a dict with 'branch' (int32 index into the slot's branches), 'residual', 'se_on' (0/1) and,
    where the slot has them, 'exp' (expansion mask), 'se' (SE width mask), 'ds_k' / 'mb_k' (kernel masks).
    """
    check_arch(space, arch)
    lay = layout(space)
    sizes = _input_sizes(space, arch.resolution)
    layers = _slots_of(space, arch)
    out: Candidate = {"stem": _mask(lay.stem, arch.stem.channels), "head": _mask(lay.head, arch.head.channels)}
    stage_ch = [lay.stages[s] for s in range(len(space.stages))]
    widths = []
    for s in range(len(space.stages)):
        first = next(ly for sl, ly in zip(lay.slots, layers) if sl.stage == s and ly is not None)
        widths.append(first.out_channels)
    out["stages"] = tuple(_mask(n, c) for n, c in zip(stage_ch, widths))
    for slot, ly, size in zip(lay.slots, layers, sizes):
        out[slot.name] = _slot_arrays(slot, ly, size)
    return out


def _slot_kind(slot: Slot, ly: Layer | None) -> tuple[str, str]:
    if ly is None:
        return ("off", "")
    if ly.block == "ds":
        return ("ds", ly.act)
    if ly.block == "mb":
        return ("mb" if ly.expanded_channels != ly.in_channels else "mb_noexp", ly.act)
    return ("skip_id", "") if ly.residual else ("skip_conv", "")


def _slot_arrays(slot: Slot, ly: Layer | None, size: int) -> dict[str, np.ndarray]:
    kind = _slot_kind(slot, ly)
    d = {"branch": np.int32(slot.branches.index(kind)),
         "residual": np.float32(ly is not None and ly.residual and ly.block == "mb"),
         "se_on": np.float32(ly is not None and ly.block == "mb" and ly.se > 0)}
    if slot.expanded:
        d["exp"] = _mask(slot.expanded, ly.expanded_channels if ly is not None and ly.block == "mb" else 0)
    if slot.se:
        d["se"] = _mask(slot.se, ly.se_channels if ly is not None and ly.block == "mb" else 0)
    for block, big in (("ds", slot.ds_kernel), ("mb", slot.mb_kernel)):
        if big:
            m = np.zeros((big, big), np.float32)
            if ly is not None and ly.block == block:
                o = kernel_window(size, ly.kernel, big, slot.stride)
                m[o:o + ly.kernel, o:o + ly.kernel] = 1.0
            d[f"{block}_k"] = m
    return d


def stack_candidates(cands: list[Candidate]) -> Candidate:
    """Stack candidates of one space along a new leading axis (for `lax.scan`/`lax.map` over them)."""
    if not cands:
        raise SpaceError("stack_candidates: no candidates given")
    try:
        return jax.tree.map(lambda *xs: np.stack(xs), *cands)
    except ValueError as e:
        raise SpaceError(f"stack_candidates: candidates of different spaces ({e})") from None


# ==================================================================== largest / smallest
def _op_rank(op) -> tuple:
    return (_BLOCK_RANK[op.block], op.expansion, op.kernel, op.se)


def extreme(space: SearchSpace, largest: bool) -> Architecture:
    """The largest (widest, deepest, biggest op per layer) or smallest architecture of `space`."""
    pick = max if largest else min
    choices = {}
    for d in space.decisions():
        if d.layer is not None or d.name.endswith(".op"):
            idx = pick(range(len(d.options)), key=lambda i: _op_rank(d.options[i]))
        else:
            idx = pick(range(len(d.options)), key=lambda i: d.options[i])
        choices[d.name] = idx
    return space.from_choices(choices)


# ==================================================================== the module
class _BN(nn.Module):
    """nn.BatchNorm's variables (params scale/bias, batch_stats mean/var), declared only."""

    features: int

    @nn.compact
    def __call__(self) -> tuple[dict, dict]:
        c = self.features
        p = {"scale": self.param("scale", nn.initializers.ones, (c,), jnp.float32),
             "bias": self.param("bias", nn.initializers.zeros, (c,), jnp.float32)}
        s = {"mean": self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32)).value,
             "var": self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32)).value}
        return p, s


class _ConvBN(nn.Module):
    """A conv kernel (HWIO) and its BatchNorm, declared only (names as in `model.ConvBN`)."""

    shape: tuple[int, int, int, int]

    @nn.compact
    def __call__(self) -> dict:
        k = self.param("kernel", CONV_INIT, self.shape)
        p, s = _BN(self.shape[-1], name="bn")()
        return {"kernel": k, "bn": p, "stats": s}


class _Dense(nn.Module):
    shape: tuple[int, int]

    @nn.compact
    def __call__(self) -> dict:
        return {"kernel": self.param("kernel", nn.linear.default_kernel_init, self.shape),
                "bias": self.param("bias", nn.initializers.zeros, (self.shape[1],))}


def _declare(space: SearchSpace, lay: Layout) -> dict:
    """Declare every variable (inside `Supernet.__call__`), returning them as a plain tree."""
    c_in = space.in_channels
    k = space.stem.kernel
    v = {"stem": _ConvBN((k, k, c_in, lay.stem), name="stem")()}
    for sl in lay.slots:
        d = {}
        if sl.ds_kernel:
            d["ds"] = {"dw": _ConvBN((sl.ds_kernel, sl.ds_kernel, 1, sl.cin), name=f"{sl.name}_ds_dw")(),
                       "pw": _ConvBN((1, 1, sl.cin, sl.cout), name=f"{sl.name}_ds_pw")()}
        if sl.mb_kernel:
            m = {"dw": _ConvBN((sl.mb_kernel, sl.mb_kernel, 1, sl.expanded), name=f"{sl.name}_mb_dw")(),
                 "project": _ConvBN((1, 1, sl.expanded, sl.cout), name=f"{sl.name}_mb_project")()}
            if any(b[0] == "mb" for b in sl.branches):
                m["expand"] = _ConvBN((1, 1, sl.cin, sl.expanded), name=f"{sl.name}_mb_expand")()
            if sl.se:
                m["se"] = {"reduce": _Dense((sl.expanded, sl.se), name=f"{sl.name}_mb_se_reduce")(),
                           "expand": _Dense((sl.se, sl.expanded), name=f"{sl.name}_mb_se_expand")()}
            d["mb"] = m
        if sl.shortcut:
            d["skip"] = {"shortcut": _ConvBN((1, 1, sl.cin, sl.cout), name=f"{sl.name}_skip_shortcut")()}
        v[sl.name] = d
    v["head"] = _ConvBN((1, 1, lay.stages[-1], lay.head), name="head")()
    v["classifier"] = _Dense((lay.head, space.num_classes), name="classifier")()
    return v


class Supernet(nn.Module):
    """The weight-sharing supernet of `space`: `__call__(x, cand, train)` -> logits of candidate `cand`.

    `cand` is `candidate(space, arch)` (NumPy or traced arrays: one compiled program serves every
    candidate at one input resolution). With `train=True` BatchNorm normalises with batch statistics
    (the running statistics are not updated: they are re-estimated per candidate, see
    `evaluators.supernet.recalibrate`); with `moments=True` the call also returns each BatchNorm's
    batch mean and mean of squares, as a tree shaped like the 'batch_stats' collection ('mean' and
    'var' holding E[x] and E[x^2]; zeros for BatchNorms the candidate does not use). Head dropout
    applies in training mode when a 'dropout' RNG is given.

    Variable names: 'stem', 'head', 'classifier' as in `model.Net`; per slot `s{S}_l{L}_ds_dw`,
    `..._ds_pw`, `..._mb_expand`, `..._mb_dw`, `..._mb_se_reduce`, `..._mb_se_expand`,
    `..._mb_project`, `..._skip_shortcut` (`extract` maps them to a stand-alone network).
    """

    space: SearchSpace

    @nn.compact
    def __call__(self, x: jnp.ndarray, cand: Candidate, train: bool = False, moments: bool = False):
        lay = layout(self.space)
        v = _declare(self.space, lay)
        if self.is_initializing():
            return jnp.zeros((x.shape[0], self.space.num_classes), jnp.float32)
        logits, feats, mom = forward(self.space, v, x, cand, train)
        if train and self.space.dropout and self.has_rng("dropout"):
            logits = _classify(v, nn.Dropout(self.space.dropout, deterministic=False)(feats))
        return (logits, mom) if moments else logits


def variable_shapes(space: SearchSpace, resolution: int | None = None) -> dict[str, Any]:
    """{'params', 'batch_stats'} of `Supernet(space)` as ShapeDtypeStructs (nothing is computed)."""
    res = resolution or space.resolutions[0]
    cand = candidate(space, extreme(space, largest=True))
    x = jax.ShapeDtypeStruct((1, res, res, space.in_channels), jnp.float32)
    return _plain(jax.eval_shape(lambda x, c: Supernet(space).init(jax.random.PRNGKey(0), x, c), x, cand))


def initialize(space: SearchSpace, seed: int = 0) -> dict[str, Any]:
    """Fresh supernet variables as NumPy arrays, deterministic in `seed`: conv kernels He normal on
    fan-out, dense kernels LeCun truncated normal, biases 0, BatchNorm scale 1, statistics 0 / 1 (the
    initialisers the module declares; drawn in NumPy because a traced random init took a minute here)."""
    def leaf(path: tuple[str, ...], spec: Any) -> np.ndarray:
        shape, name = tuple(spec.shape), path[-1]
        rng = np.random.default_rng([seed, zlib.crc32("/".join(path).encode())])
        if name in ("bias", "mean"):
            return np.zeros(shape, np.float32)
        if name in ("scale", "var"):
            return np.ones(shape, np.float32)
        if len(shape) == 4:
            return rng.normal(0.0, math.sqrt(2.0 / (shape[0] * shape[1] * shape[3])), shape).astype(np.float32)
        z = rng.standard_normal(shape)
        while np.any(np.abs(z) > 2):
            bad = np.abs(z) > 2
            z[bad] = rng.standard_normal(int(bad.sum()))
        return (z * math.sqrt(1.0 / shape[0]) / 0.87962566103423978).astype(np.float32)

    flat = flax.traverse_util.flatten_dict(variable_shapes(space))
    return flax.traverse_util.unflatten_dict({p: leaf(p, spec) for p, spec in sorted(flat.items())})


# ==================================================================== the computation
def _act(name: str, y: jnp.ndarray) -> jnp.ndarray:
    return ACT_FNS[name](y) if name else y


def _conv_bn(p: dict, x: jnp.ndarray, kind: str, stride: int, train: bool, mask: jnp.ndarray, act: str = "",
             kmask: jnp.ndarray | None = None) -> tuple[jnp.ndarray, dict]:
    """Masked conv + BatchNorm + activation; returns (y, {'mean': E[y_conv], 'var': E[y_conv^2]})."""
    w = p["kernel"]
    if kmask is not None:
        w = w * kmask[:, :, None, None]
    y = KERNELS["fast"][kind](x, w, stride)
    scale, bias = p["bn"]["scale"], p["bn"]["bias"]
    if train:
        y, s1, s2 = batch_norm_train(y, scale, bias, BN_EPS)
        n = y.size // y.shape[-1]
        mom = {"mean": s1 / n, "var": s2 / n}
    else:
        st = p["stats"]
        y = (y - st["mean"]) * (lax.rsqrt(st["var"] + BN_EPS) * scale) + bias
        mom = {"mean": jnp.zeros_like(scale), "var": jnp.zeros_like(scale)}
    return _act(act, y) * mask, mom


def _fit(x: jnp.ndarray, c: int) -> jnp.ndarray:
    """x with its channel axis cut or zero-padded to c (inactive channels are zero anyway)."""
    have = x.shape[-1]
    if have >= c:
        return x[..., :c]
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, c - have)])


def _zero_moments(tree: dict) -> dict:
    """A moments tree of zeros for every ConvBN in `tree`."""
    if "kernel" in tree and "bn" in tree:
        z = jnp.zeros_like(tree["bn"]["scale"])
        return {"mean": z, "var": z}
    return {k: _zero_moments(t) for k, t in tree.items() if isinstance(t, dict) and k not in ("bn", "stats")
            and _has_conv(t)}


def _has_conv(tree: dict) -> bool:
    if "kernel" in tree and "bn" in tree:
        return True
    return any(isinstance(t, dict) and _has_conv(t) for t in tree.values())


def _slot_forward(sl: Slot, v: dict, c: dict, x: jnp.ndarray, in_mask: jnp.ndarray, out_mask: jnp.ndarray,
                  train: bool) -> tuple[jnp.ndarray, dict]:
    """One slot under `lax.switch` on c['branch']: only the taken branch runs."""
    zero = _zero_moments(v)

    def with_moments(updates: dict) -> dict:
        out = jax.tree.map(lambda a: a, zero)
        for path, m in updates.items():
            node = out
            for k in path[:-1]:
                node = node[k]
            node[path[-1]] = m
        return out

    def off(x):
        return _fit(x, sl.cout), zero

    def ds(act):
        def run(x):
            p = v["ds"]
            y, m1 = _conv_bn(p["dw"], x, "dwconv", sl.stride, train, in_mask, act, c["ds_k"])
            y, m2 = _conv_bn(p["pw"], y, "pwconv", 1, train, out_mask, act)
            return y, with_moments({("ds", "dw"): m1, ("ds", "pw"): m2})
        return run

    def mb(act, expand: bool):
        def run(x):
            p = v["mb"]
            ups = {}
            if expand:
                y, ups[("mb", "expand")] = _conv_bn(p["expand"], x, "pwconv", 1, train, c["exp"], act)
            else:
                y = _fit(x, sl.expanded)
            y, ups[("mb", "dw")] = _conv_bn(p["dw"], y, "dwconv", sl.stride, train,
                                            c["exp"] if expand else _fit(in_mask, sl.expanded), act, c["mb_k"])
            if sl.se:
                se = p["se"]
                s = jnp.mean(y, axis=(1, 2))
                s = jax.nn.relu(s @ se["reduce"]["kernel"] + se["reduce"]["bias"]) * c["se"]
                gate = ACT_FNS["hsigmoid" if act == "hswish" else "sigmoid"](s @ se["expand"]["kernel"]
                                                                             + se["expand"]["bias"])
                y = y * (c["se_on"] * gate + (1.0 - c["se_on"]))[:, None, None, :]
            y, ups[("mb", "project")] = _conv_bn(p["project"], y, "pwconv", 1, train, out_mask)
            if sl.stride == 1:
                y = y + c["residual"] * _fit(x, sl.cout)
            return y, with_moments(ups)
        return run

    def skip_id(x):
        return _fit(x, sl.cout), zero

    def skip_conv(x):
        y, m = _conv_bn(v["skip"]["shortcut"], x, "pwconv", sl.stride, train, out_mask)
        return y, with_moments({("skip", "shortcut"): m})

    fns = []
    for kind, act in sl.branches:
        fns.append({"off": lambda a: off, "ds": ds, "mb": lambda a: mb(a, True), "mb_noexp": lambda a: mb(a, False),
                    "skip_id": lambda a: skip_id, "skip_conv": lambda a: skip_conv}[kind](act))
    if len(fns) == 1:
        return fns[0](x)
    return lax.switch(c["branch"], fns, x)


def forward(space: SearchSpace, v: dict, x: jnp.ndarray, cand: Candidate,
            train: bool) -> tuple[jnp.ndarray, jnp.ndarray, dict]:
    """(logits, pooled features, moments) of candidate `cand` with the declared variables `v`."""
    lay = layout(space)
    mom: dict = {}
    st = space.stem
    x, mom["stem"] = _conv_bn(v["stem"], x, "conv", st.stride, train, cand["stem"], st.act)
    in_mask = cand["stem"]
    for sl in lay.slots:
        out_mask = cand["stages"][sl.stage]
        x, mom[sl.name] = _slot_forward(sl, v[sl.name], cand[sl.name], x, in_mask, out_mask, train)
        in_mask = out_mask
    x, mom["head"] = _conv_bn(v["head"], x, "pwconv", 1, train, cand["head"], space.head_act)
    feats = jnp.mean(x, axis=(1, 2))
    return _classify(v, feats), feats, _moment_tree(lay, mom)


def _classify(v: dict, feats: jnp.ndarray) -> jnp.ndarray:
    return feats @ v["classifier"]["kernel"] + v["classifier"]["bias"]


def _moment_tree(lay: Layout, mom: dict) -> dict:
    """Moments keyed like the 'batch_stats' collection ({module: {'bn': {'mean', 'var'}}})."""
    out = {"stem": {"bn": mom["stem"]}, "head": {"bn": mom["head"]}}
    names = {("ds", "dw"): "ds_dw", ("ds", "pw"): "ds_pw", ("mb", "expand"): "mb_expand", ("mb", "dw"): "mb_dw",
             ("mb", "project"): "mb_project", ("skip", "shortcut"): "skip_shortcut"}
    for sl in lay.slots:
        for (blk, part), suffix in names.items():
            m = mom[sl.name].get(blk, {}).get(part)
            if m is not None:
                out[f"{sl.name}_{suffix}"] = {"bn": m}
    return out


# ==================================================================== stand-alone variables
def extract(space: SearchSpace, arch: Architecture, variables: Mapping[str, Any]) -> dict[str, Any]:
    """{'params', 'batch_stats'} of `build_model(arch)` sliced from the supernet's `variables`
    (NumPy), so every stage that takes a stand-alone network (distill, export, nas.load) takes this one."""
    check_arch(space, arch)
    lay = layout(space)
    P = jax.tree.map(np.asarray, _plain(variables["params"]))
    S = jax.tree.map(np.asarray, _plain(variables["batch_stats"]))
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}

    def conv(dst: tuple[str, ...], src: str, cin: int, cout: int, window: tuple[int, int] | None = None) -> None:
        k = P[src]["kernel"]
        if window is None:
            k = k[:, :, :cin, :cout]
        else:  # depthwise: (k, k, 1, channels)
            o, n = window
            k = k[o:o + n, o:o + n, :, :cout]
        _put(params, dst, {"kernel": k, "bn": {n_: a[:cout] for n_, a in P[src]["bn"].items()}})
        _put(stats, dst, {"bn": {n_: a[:cout] for n_, a in S[src]["bn"].items()}})

    def dense(dst: tuple[str, ...], src: str, cin: int, cout: int) -> None:
        _put(params, dst, {"kernel": P[src]["kernel"][:cin, :cout], "bias": P[src]["bias"][:cout]})

    conv(("stem",), "stem", arch.in_channels, arch.stem.channels)
    sizes = _input_sizes(space, arch.resolution)
    i = 0
    for sl, ly, size in zip(lay.slots, _slots_of(space, arch), sizes):
        if ly is None:
            continue
        name, pre = f"layer{i}", sl.name
        i += 1
        if ly.block == "ds":
            conv((name, "dw"), f"{pre}_ds_dw", 1, ly.in_channels,
                 (kernel_window(size, ly.kernel, sl.ds_kernel, sl.stride), ly.kernel))
            conv((name, "pw"), f"{pre}_ds_pw", ly.in_channels, ly.out_channels)
        elif ly.block == "mb":
            e = ly.expanded_channels
            if e != ly.in_channels:
                conv((name, "expand"), f"{pre}_mb_expand", ly.in_channels, e)
            conv((name, "dw"), f"{pre}_mb_dw", 1, e, (kernel_window(size, ly.kernel, sl.mb_kernel, sl.stride), ly.kernel))
            if ly.se:
                dense((name, "se", "reduce"), f"{pre}_mb_se_reduce", e, ly.se_channels)
                dense((name, "se", "expand"), f"{pre}_mb_se_expand", ly.se_channels, e)
            conv((name, "project"), f"{pre}_mb_project", e, ly.out_channels)
        elif not ly.residual:
            conv((name, "shortcut"), f"{pre}_skip_shortcut", ly.in_channels, ly.out_channels)
    last = arch.layers[-1].out_channels if arch.layers else arch.stem.channels
    conv(("head",), "head", last, arch.head.channels)
    dense(("classifier",), "classifier", arch.head.channels, arch.num_classes)
    copy = lambda a: np.array(a, copy=True)  # noqa: E731  (slices would pin the whole supernet array)
    return {"params": jax.tree.map(copy, params), "batch_stats": jax.tree.map(copy, stats)}


def _put(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _plain(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


# ==================================================================== channel groups
Axis = tuple[tuple[str, ...], int]  # (path inside a params/batch_stats tree, axis)


@dataclass(frozen=True)
class ChannelGroup:
    """One set of channels shared by several tensor axes; permuting all of them together leaves the
    largest candidate's function unchanged. `kernels` are the weights whose magnitude ranks a channel."""

    name: str
    size: int
    params: tuple[Axis, ...]
    stats: tuple[Axis, ...]
    kernels: tuple[Axis, ...]


@functools.lru_cache(maxsize=32)
def channel_groups(space: SearchSpace) -> tuple[ChannelGroup, ...]:
    """The supernet's permutable channel groups: stem, each stage, each mb expansion and SE width, head.

    Groups that a candidate can tie together with different sizes (an mb layer without expansion
    reads its input channels as expanded ones; an identity shortcut between a stem and a stride-1
    stage of other widths) are left out: no permutation of one alone keeps every candidate's meaning.
    """
    lay = layout(space)
    members: dict[str, list[tuple[str, tuple[str, ...], int]]] = {}
    sizes: dict[str, int] = {}
    parent: dict[str, str] = {}

    def group(name: str, size: int) -> str:
        sizes.setdefault(name, size)
        parent.setdefault(name, name)
        members.setdefault(name, [])
        return name

    def find(g: str) -> str:
        while parent[g] != g:
            g = parent[g]
        return g

    def conv(module: str, axis: int, g: str) -> None:  # a kernel axis (and BN when it is the output axis)
        members[g].append(("kernel", (module, "kernel"), axis))
        if axis == 3:
            for leaf in ("scale", "bias"):
                members[g].append(("param", (module, "bn", leaf), 0))
            for leaf in ("mean", "var"):
                members[g].append(("stats", (module, "bn", leaf), 0))

    def dense(module: str, g_in: str, g_out: str) -> None:
        members[g_in].append(("kernel", (module, "kernel"), 0))
        members[g_out].append(("kernel", (module, "kernel"), 1))
        members[g_out].append(("param", (module, "bias"), 0))

    conv("stem", 3, group("stem", lay.stem))
    for s in range(len(space.stages)):
        group(f"stage{s}", lay.stages[s])
    for sl in lay.slots:
        g_in = ("stem" if sl.stage == 0 else f"stage{sl.stage - 1}") if sl.index == 0 else f"stage{sl.stage}"
        g_out = f"stage{sl.stage}"
        kinds = {k for k, _ in sl.branches}
        if sl.ds_kernel:
            conv(f"{sl.name}_ds_dw", 3, g_in)
            conv(f"{sl.name}_ds_pw", 2, g_in)
            conv(f"{sl.name}_ds_pw", 3, g_out)
        if sl.mb_kernel:
            g_exp = group(f"{sl.name}.exp", sl.expanded)
            if "mb" in kinds:
                conv(f"{sl.name}_mb_expand", 2, g_in)
                conv(f"{sl.name}_mb_expand", 3, g_exp)
            conv(f"{sl.name}_mb_dw", 3, g_exp)
            if sl.se:
                g_se = group(f"{sl.name}.se", sl.se)
                dense(f"{sl.name}_mb_se_reduce", g_exp, g_se)
                dense(f"{sl.name}_mb_se_expand", g_se, g_exp)
            conv(f"{sl.name}_mb_project", 2, g_exp)
            conv(f"{sl.name}_mb_project", 3, g_out)
            if "mb_noexp" in kinds:
                parent[find(g_exp)] = find(g_in)
        if sl.shortcut:
            conv(f"{sl.name}_skip_shortcut", 2, g_in)
            conv(f"{sl.name}_skip_shortcut", 3, g_out)
        if g_in != g_out and sl.stride == 1 and ("skip_id" in kinds or "mb" in kinds or "mb_noexp" in kinds):
            parent[find(g_in)] = find(g_out)  # a residual may add the input to the output
    conv("head", 2, f"stage{len(space.stages) - 1}")
    conv("head", 3, group("head", lay.head))
    members["head"].append(("kernel", ("classifier", "kernel"), 0))

    unions: dict[str, list[str]] = {}
    for g in members:
        unions.setdefault(find(g), []).append(g)
    out = []
    for root, names in unions.items():
        if len({sizes[n] for n in names}) > 1:
            continue  # tied groups of different widths: not permutable
        mem = [m for n in names for m in members[n]]
        out.append(ChannelGroup(
            name="+".join(names), size=sizes[root],
            params=tuple((p, a) for kind, p, a in mem if kind in ("kernel", "param")),
            stats=tuple((p, a) for kind, p, a in mem if kind == "stats"),
            kernels=tuple((p, a) for kind, p, a in mem if kind == "kernel")))
    return tuple(out)


def channel_importance(space: SearchSpace, params: Mapping[str, Any]) -> list[np.ndarray]:
    """Per channel group, the permutation that sorts its channels by decreasing importance: the L1 norm
    of every kernel slice the channel owns (its producing filters and its consuming weights)."""
    params = _plain(params)
    perms = []
    for g in channel_groups(space):
        score = np.zeros(g.size)
        for path, axis in g.kernels:
            w = np.abs(np.asarray(_get(params, path), np.float64))
            score += w.sum(axis=tuple(i for i in range(w.ndim) if i != axis))
        perms.append(np.argsort(-score, kind="stable"))
    return perms


def permute_channels(space: SearchSpace, tree: Mapping[str, Any], perms: list[np.ndarray],
                     collection: str = "params") -> dict[str, Any]:
    """`tree` (a params-shaped tree, e.g. parameters or an optimizer's moments, or with
    collection='batch_stats' the running statistics) with every channel group re-ordered by `perms`."""
    out = jax.tree.map(lambda a: a, _plain(tree))
    for g, perm in zip(channel_groups(space), perms):
        for path, axis in (g.params if collection == "params" else g.stats):
            a = _get(out, path)
            _put(out, path, jnp.take(a, jnp.asarray(perm), axis=axis) if isinstance(a, jax.Array)
                 else np.take(np.asarray(a), perm, axis=axis))
    return out


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree
