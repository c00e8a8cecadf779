"""Structured channel pruning: physically remove output channels, giving a smaller dense network.

Every prunable width of an `Architecture` is a *channel group*:

| group | channels | producers (ranked by) | sliced along the input axis of |
|---|---|---|---|
| `stage{j}` | the stem output and every layer output joined to it by a residual add, and the depthwise convs that run on them (ds, mb without expansion) | stem / `pw` / `project` / `shortcut` / such `dw` ConvBN | the next layer's first conv, its dw, SE, head |
| `layer{i}.expand` | an `mb` block's expansion (its dw and SE run on these) | `expand` and `dw` ConvBN | dw, SE, `project` |
| `layer{i}.se` | an SE bottleneck | `se/reduce` Dense | `se/expand` |
| `head` | the head conv | `head` ConvBN | the classifier |

Channels tied by a residual add (a block with `Layer.residual`, including identity skips) are one
group and are kept or removed together, so every add still adds like channels. A group keeps at
least one channel; widths are then nudged by one channel where a pruned width would change the
network's *structure* (an `mb` expansion equal to its input width drops its expand conv; a
non-residual stride-1 block whose in and out widths meet becomes residual).

The pruned `Architecture` has the same space and layers with new widths (which need not be among
the space's options): `expansion` becomes expanded/in and `se` a ratio whose `se_channels` is the
kept SE width; its key is `ORIGINAL_KEY~pF` with F the fraction of the pruned-for cost kept
(e.g. '0-1-0~p0.50'): '~' never occurs in a space key, so a pruned key cannot be decoded as if it
were a search candidate. The weights are the original ones sliced (`slice_variables`).

Importance criteria (`CRITERIA`): 'l1' (L1 norm of each output filter, Li et al. 2017), 'bn'
(|BatchNorm scale|, network slimming, Liu et al. 2017), 'taylor' (|gamma dL/dgamma + beta dL/dbeta|
summed over a few batches: first-order Taylor estimate of the loss change, Molchanov et al. 2019).
Each group's scores are divided by their mean before one global ranking, so groups of different
scales compete fairly; the least important channels are removed until the target holds.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from evaluators.cost import analytic_cost
from evaluators.hardware import PROFILES
from evaluators.latency import predict_latency_ms
from search_spaces.architecture import Architecture, Layer
from search_spaces.errors import NasError
from search_spaces.model import build_model

CRITERIA = ("l1", "bn", "taylor")
TARGET_KINDS = ("macs", "params", "latency_ms")
Keep = Mapping[str, np.ndarray]  # group name -> sorted indices of the channels kept


# ============================================================ channel groups
@dataclass(frozen=True)
class Group:
    """One prunable width: its name, width, and the (module path, kind) of each producer."""

    name: str
    width: int
    producers: tuple[tuple[tuple[str, ...], str], ...]  # kind: 'convbn' | 'dense'


def _stage_roots(arch: Architecture) -> list[int]:
    """For each tensor (0 = stem output, i + 1 = layer i output), the index of the first tensor of its
    residual chain: the tensors a residual add joins share a root."""
    roots = [0]
    for i, ly in enumerate(arch.layers):
        roots.append(roots[i] if ly.residual else i + 1)
    return roots


def _producer(i: int, ly: Layer) -> tuple[tuple[str, ...], str] | None:
    if ly.block == "ds":
        return (f"layer{i}", "pw"), "convbn"
    if ly.block == "mb":
        return (f"layer{i}", "project"), "convbn"
    if not ly.residual:
        return (f"layer{i}", "shortcut"), "convbn"
    return None  # identity skip


def channel_groups(arch: Architecture) -> dict[str, Group]:
    """Every prunable channel group of `arch`, by name (see the module docstring)."""
    roots = _stage_roots(arch)
    prods: dict[int, list] = {0: [(("stem",), "convbn")]}
    widths = {0: arch.stem.channels}
    for i, ly in enumerate(arch.layers):
        if ly.block == "ds" or (ly.block == "mb" and ly.expanded_channels == ly.in_channels):
            prods[roots[i]].append(((f"layer{i}", "dw"), "convbn"))  # a depthwise conv on the stage channels
        r = roots[i + 1]
        widths.setdefault(r, ly.out_channels)
        p = _producer(i, ly)
        if p is not None:
            prods.setdefault(r, []).append(p)
    groups = {f"stage{r}": Group(f"stage{r}", widths[r], tuple(prods[r])) for r in sorted(prods)}
    for i, ly in enumerate(arch.layers):
        if ly.block == "mb" and ly.expanded_channels != ly.in_channels:
            groups[f"layer{i}.expand"] = Group(f"layer{i}.expand", ly.expanded_channels,
                                               (((f"layer{i}", "expand"), "convbn"), ((f"layer{i}", "dw"), "convbn")))
        if ly.block == "mb" and ly.se:
            groups[f"layer{i}.se"] = Group(f"layer{i}.se", ly.se_channels, (((f"layer{i}", "se", "reduce"), "dense"),))
    groups["head"] = Group("head", arch.head.channels, ((("head",), "convbn"),))
    return groups


def tensor_groups(arch: Architecture) -> list[str]:
    """The stage group of each tensor: [stem output, layer 0 output, ...]."""
    return [f"stage{r}" for r in _stage_roots(arch)]


def _inner_group(arch: Architecture, i: int) -> str:
    """The group of the channels an `mb`/`ds` block's depthwise conv runs on."""
    ly = arch.layers[i]
    if ly.block == "mb" and ly.expanded_channels != ly.in_channels:
        return f"layer{i}.expand"
    return tensor_groups(arch)[i]


# ============================================================ importance
def _get(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _normalized(x: np.ndarray) -> np.ndarray:
    m = float(np.mean(x))
    return x / m if m > 0 else np.zeros_like(x)


def importance(arch: Architecture, variables: Mapping[str, Any], criterion: str,
               grads: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Per group, one score per channel (higher = more important), each producer's scores
    normalised to mean 1 and summed over the group's producers.

    Args:
      arch, variables: the network and its {'params', 'batch_stats'}.
      criterion: one of `CRITERIA`.
      grads: for 'taylor', the summed |d loss / d params| tree as returned by `taylor_grads`
        (a params-shaped tree of gradients accumulated over batches).
    """
    if criterion not in CRITERIA:
        raise NasError(f"prune.criterion: unknown criterion '{criterion}'; allowed: {', '.join(CRITERIA)}")
    if criterion == "taylor" and grads is None:
        raise NasError("prune.criterion: 'taylor' needs gradients (taylor_grads) on training data")
    params = variables["params"]
    out: dict[str, np.ndarray] = {}
    for name, g in channel_groups(arch).items():
        total = np.zeros(g.width, np.float64)
        for path, kind in g.producers:
            mod = _get(params, path)
            gmod = _get(grads, path) if grads is not None else None
            if kind == "dense":
                w, b = np.asarray(mod["kernel"], np.float64), np.asarray(mod["bias"], np.float64)
                if criterion == "taylor":
                    gw, gb = np.asarray(gmod["kernel"]), np.asarray(gmod["bias"])
                    s = np.abs((w * gw).sum(axis=0) + b * gb)
                else:
                    s = np.abs(w).sum(axis=0)
            elif criterion == "l1":
                k = np.asarray(mod["kernel"], np.float64)
                s = np.abs(k).reshape(-1, k.shape[-1]).sum(axis=0)
            elif criterion == "bn":
                s = np.abs(np.asarray(mod["bn"]["scale"], np.float64))
            else:
                sc, bi = np.asarray(mod["bn"]["scale"], np.float64), np.asarray(mod["bn"]["bias"], np.float64)
                s = np.abs(sc * np.asarray(gmod["bn"]["scale"]) + bi * np.asarray(gmod["bn"]["bias"]))
            total += _normalized(s)
        out[name] = total
    return out


def taylor_grads(arch: Architecture, variables: Mapping[str, Any], x: np.ndarray, y: np.ndarray, *,
                 batch_size: int = 128) -> Any:
    """Per-batch gradients of the cross-entropy w.r.t. the params, summed over the batches of (x, y)
    (evaluation-mode BatchNorm: the statistics the deployed network uses)."""
    import jax
    import jax.numpy as jnp
    import optax


    net = build_model(arch, "fast")
    stats = jax.tree.map(jnp.asarray, variables.get("batch_stats", {}))

    @jax.jit
    def grad(params, xb, yb):
        def loss(p):
            logits = net.apply({"params": p, "batch_stats": stats}, xb, train=False)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        return jax.grad(loss)(params)

    params = jax.tree.map(jnp.asarray, variables["params"])
    total = None
    n = max(1, len(x) // batch_size)
    for b in range(n):
        g = grad(params, jnp.asarray(x[b * batch_size:(b + 1) * batch_size]),
                 jnp.asarray(y[b * batch_size:(b + 1) * batch_size]))
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return jax.tree.map(np.asarray, total)


# ============================================================ the pruned architecture
def _se_ratio(n_in: int, n_se: int) -> float:
    """An `se` ratio whose `Layer.se_channels` (max(1, int(in * se))) is exactly `n_se`."""
    return (n_se + 0.5) / n_in


def pruned_architecture(arch: Architecture, counts: Mapping[str, int], key: str | None = None) -> Architecture:
    """`arch` with each group's width replaced by `counts[group]` (missing groups keep theirs).

    Raises NasError when the counts change the network's structure (see `fix_counts`)."""
    tg = tensor_groups(arch)
    c = {name: counts.get(name, g.width) for name, g in channel_groups(arch).items()}
    layers = []
    for i, ly in enumerate(arch.layers):
        n_in, n_out = c[tg[i]], c[tg[i + 1]]
        kw: dict[str, Any] = {"in_channels": n_in, "out_channels": n_out}
        if ly.block == "mb" and f"layer{i}.expand" in c and (
                n_in, c[f"layer{i}.expand"]) != (ly.in_channels, ly.expanded_channels):
            kw["expansion"] = c[f"layer{i}.expand"] / n_in
        if ly.block == "mb" and ly.se and (n_in, c[f"layer{i}.se"]) != (ly.in_channels, ly.se_channels):
            kw["se"] = _se_ratio(n_in, c[f"layer{i}.se"])
        new = dataclasses.replace(ly, **kw)
        if new.residual != ly.residual or (ly.block == "mb" and (new.expanded_channels == n_in) !=
                                           (ly.expanded_channels == ly.in_channels)):
            raise NasError(f"prune: widths {n_in}->{n_out} change the structure of layer {i} ({ly.token()})")
        if ly.block == "mb" and f"layer{i}.expand" in c and new.expanded_channels != c[f"layer{i}.expand"]:
            raise NasError(f"prune: layer {i}: expansion {kw['expansion']} does not give {c[f'layer{i}.expand']}")
        if ly.se and new.se_channels != c[f"layer{i}.se"]:
            raise NasError(f"prune: layer {i}: se {kw['se']} does not give {c[f'layer{i}.se']} channels")
        layers.append(new)
    out = dataclasses.replace(
        arch, key=key or arch.key, stem=dataclasses.replace(arch.stem, channels=c[tg[0]]), layers=tuple(layers),
        head=dataclasses.replace(arch.head, channels=c["head"]))
    out.validate()
    return out


def round_width(n: int, width: int, divisor: int) -> int:
    """`n` rounded up to a multiple of `divisor` (at most `width`, at least 1)."""
    if divisor <= 1:
        return int(min(max(1, n), width))
    return int(min(width, max(divisor, -(-n // divisor) * divisor)))


def fix_counts(arch: Architecture, counts: Mapping[str, int], divisor: int = 1) -> dict[str, int]:
    """Round widths up to multiples of `divisor`, then nudge them by `divisor` channels (up where
    possible, else down) until they keep the structure: an mb expansion must differ from its input
    width, and a non-residual stride-1 mb/skip block must keep different in and out widths."""
    groups = channel_groups(arch)
    c = {n: round_width(counts.get(n, g.width), g.width, divisor) for n, g in groups.items()}
    tg = tensor_groups(arch)
    step = max(1, divisor)

    def nudge(name: str, avoid: int) -> None:
        w = groups[name].width
        up = min(w, c[name] + step)
        c[name] = up if up != c[name] and up != avoid else max(1, c[name] - step)

    for _ in range(4 * len(c)):
        changed = False
        for i, ly in enumerate(arch.layers):
            n_in, n_out = c[tg[i]], c[tg[i + 1]]
            if (ly.block in ("mb", "skip") and ly.stride == 1 and not ly.residual and n_in == n_out):
                nudge(tg[i + 1], n_in)
                changed = True
            e = f"layer{i}.expand"
            if e in c and c[e] == c[tg[i]]:
                nudge(e, c[tg[i]])
                changed = True
        if not changed:
            return c
    raise NasError(f"prune: no widths near {counts} keep the structure of '{arch.key}'")


def floor_architecture(arch: Architecture, min_keep: float = 0.0, divisor: int = 1) -> Architecture:
    """The smallest network pruning may reach: every group at its floor (min_keep of its width, >= 1)."""
    counts = {n: max(1, math.ceil(min_keep * g.width)) for n, g in channel_groups(arch).items()}
    return pruned_architecture(arch, fix_counts(arch, counts, divisor))


def _savings(arch: Architecture, cost: Callable[[Architecture], float]) -> dict[str, float]:
    """Per group, the cost one of its channels adds (removing half of the group, per channel removed)."""
    full = cost(arch)
    out = {}
    for n, g in channel_groups(arch).items():
        half = max(1, g.width // 2)
        try:
            out[n] = max(0.0, (full - cost(pruned_architecture(arch, fix_counts(arch, {n: half}))))) / max(
                1, g.width - half)
        except NasError:
            out[n] = 0.0
    return out


def select(arch: Architecture, scores: Mapping[str, np.ndarray], cost: Callable[[Architecture], float],
           target: float, *, min_keep: float = 0.0, divisor: int = 1,
           cost_aware: bool = False) -> tuple[dict[str, np.ndarray], Architecture]:
    """The most important channels whose network costs at most `target`: remove channels in
    increasing order of priority (one global ranking), as few as reach the target (binary search
    over how many). Returns (kept indices per group, pruned architecture with the original key).

    Args:
      min_keep: each group keeps at least this fraction of its width (and at least one channel).
      divisor: kept widths are rounded up to multiples of it. ONNX Runtime's blocked (NCHWc) CPU
        convolutions take only channel counts that are multiples of the block (16 with AVX-512),
        others fall back to a far slower path: on mobile_small 1131001--11d7-1 (28x28) a 50%-MACs
        network with ragged widths ran 3x slower than the original at batch 32, with multiples of
        8 1.65x faster, with multiples of 16 7.4x faster (random weights, one thread, shared machine).
      cost_aware: priority = score / (the cost one channel of the group adds, relative to the
        mean over groups): cheap channels (stem, head at 1x1) are kept, expensive ones go first.
        Otherwise priority = score.

    Raises NasError if the floor (min_keep, one channel per group) costs more than `target`."""
    groups = channel_groups(arch)
    weight = {n: 1.0 for n in groups}
    if cost_aware:
        sav = _savings(arch, cost)
        mean = float(np.mean([v for v in sav.values() if v > 0] or [1.0]))
        weight = {n: mean / sav[n] if sav[n] > 0 else 1e9 for n in groups}
    order = sorted(((float(s) * weight[name], name, j) for name, sc in scores.items() for j, s in enumerate(sc)),
                   key=lambda t: (t[0], t[1], t[2]))
    floor_n = {n: max(1, math.ceil(min_keep * g.width)) for n, g in groups.items()}
    floor = floor_architecture(arch, min_keep, divisor)
    if cost(floor) > target:
        what = "one channel per group" if min_keep == 0 else f"min_keep {min_keep:g} of each group"
        raise NasError(f"prune: target {target:g} is below the smallest reachable {cost(floor):g} "
                       f"({what}); allowed a target >= {cost(floor):g}")

    def keep_after(k: int) -> dict[str, np.ndarray]:
        dropped: dict[str, set[int]] = {n: set() for n in groups}
        for _, name, j in order[:k]:
            if len(dropped[name]) < groups[name].width - floor_n[name]:
                dropped[name].add(j)
        return {n: np.array([j for j in range(g.width) if j not in dropped[n]]) for n, g in groups.items()}

    def build(keep: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], Architecture]:
        counts = fix_counts(arch, {n: len(v) for n, v in keep.items()}, divisor)
        keep = {n: _resize(keep[n], counts[n], scores[n]) for n in keep}
        return keep, pruned_architecture(arch, counts)

    lo, hi = 0, len(order)  # invariant: removing hi channels meets the target (hi = all: the floor)
    while lo < hi:
        mid = (lo + hi) // 2
        if cost(build(keep_after(mid))[1]) <= target:
            hi = mid
        else:
            lo = mid + 1
    keep, pruned = build(keep_after(hi))
    if cost(pruned) > target:  # a nudge upwards overshot: fall back to the floor's widths
        keep, pruned = build(keep_after(len(order)))
    return keep, pruned


def _resize(keep: np.ndarray, n: int, scores: np.ndarray) -> np.ndarray:
    """`keep` grown or shrunk to `n` channels by score (after a structural nudge)."""
    if len(keep) == n:
        return np.sort(keep)
    if len(keep) > n:
        return np.sort(keep[np.argsort(-scores[keep], kind="stable")[:n]])
    rest = np.setdiff1d(np.arange(len(scores)), keep)
    extra = rest[np.argsort(-scores[rest], kind="stable")[:n - len(keep)]]
    return np.sort(np.concatenate([keep, extra]))


# ============================================================ slicing the weights
def _slice_convbn(params: dict, stats: dict, path: Sequence[str], kin: np.ndarray | None,
                  kout: np.ndarray | None, depthwise: bool) -> None:
    mod, smod = _get(params, path), _get(stats, path)
    k = np.asarray(mod["kernel"])
    if depthwise:
        k = k[..., kout]
    else:
        if kin is not None:
            k = k[:, :, kin, :]
        if kout is not None:
            k = k[..., kout]
    mod["kernel"] = k
    if kout is not None:
        for name in ("scale", "bias"):
            mod["bn"][name] = np.asarray(mod["bn"][name])[kout]
        for name in ("mean", "var"):
            smod["bn"][name] = np.asarray(smod["bn"][name])[kout]


def _slice_dense(params: dict, path: Sequence[str], kin: np.ndarray | None, kout: np.ndarray | None) -> None:
    mod = _get(params, path)
    w, b = np.asarray(mod["kernel"]), np.asarray(mod["bias"])
    if kin is not None:
        w = w[kin, :]
    if kout is not None:
        w, b = w[:, kout], b[kout]
    mod["kernel"], mod["bias"] = w, b


def _copy(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _copy(v) for k, v in tree.items()}
    return np.array(tree)


def slice_variables(arch: Architecture, variables: Mapping[str, Any], keep: Keep) -> dict[str, Any]:
    """`variables` of `arch` with only the kept channels of every group (a new tree, NumPy)."""
    params, stats = _copy(variables["params"]), _copy(variables.get("batch_stats", {}))
    tg = tensor_groups(arch)
    full = {n: None for n in channel_groups(arch)}
    k = {**full, **{n: np.asarray(v) for n, v in keep.items()}}
    _slice_convbn(params, stats, ("stem",), None, k[tg[0]], False)
    for i, ly in enumerate(arch.layers):
        kin, kout, p = k[tg[i]], k[tg[i + 1]], f"layer{i}"
        if ly.block == "skip":
            if not ly.residual:
                _slice_convbn(params, stats, (p, "shortcut"), kin, kout, False)
            continue
        if ly.block == "ds":
            _slice_convbn(params, stats, (p, "dw"), kin, kin, True)
            _slice_convbn(params, stats, (p, "pw"), kin, kout, False)
            continue
        inner = k[_inner_group(arch, i)]
        if ly.expanded_channels != ly.in_channels:
            _slice_convbn(params, stats, (p, "expand"), kin, inner, False)
        _slice_convbn(params, stats, (p, "dw"), inner, inner, True)
        if ly.se:
            kse = k[f"layer{i}.se"]
            _slice_dense(params, (p, "se", "reduce"), inner, kse)
            _slice_dense(params, (p, "se", "expand"), kse, inner)
        _slice_convbn(params, stats, (p, "project"), inner, kout, False)
    _slice_convbn(params, stats, ("head",), k[tg[-1]], k["head"], False)
    _slice_dense(params, ("classifier",), k["head"], None)
    return {"params": params, "batch_stats": stats}


# ============================================================ targets
@dataclass(frozen=True)
class Target:
    """What to prune to: `kind` macs|params (value = fraction kept, in (0, 1]) or latency_ms on
    `profile` (value = milliseconds)."""

    kind: str
    value: float
    profile: str = ""

    @classmethod
    def parse(cls, text: str, where: str = "--prune") -> "Target":
        """'macs=0.5', 'params=0.5' or 'latency_ms@PROFILE=0.2'."""
        allowed = "macs=F, params=F (F in (0, 1]: the fraction kept) or latency_ms@PROFILE=MS"
        name, sep, val = str(text).partition("=")
        try:
            value = float(val)
        except ValueError:
            value = math.nan
        if not sep or not math.isfinite(value) or value <= 0:
            raise NasError(f"{where}: {text!r}; allowed {allowed}")
        kind, _, profile = name.strip().partition("@")
        if kind not in TARGET_KINDS or (kind == "latency_ms") != bool(profile):
            raise NasError(f"{where}: unknown target '{name}'; allowed {allowed}")
        if kind != "latency_ms" and value > 1:
            raise NasError(f"{where}: {kind}={value:g}; allowed a fraction in (0, 1]")
        if profile:
            try:
                PROFILES.get(profile)
            except NasError:
                raise NasError(f"{where}: unknown profile '{profile}'; allowed: {', '.join(PROFILES.names())}") from None
        return cls(kind, value, profile)

    def cost_fn(self) -> Callable[[Architecture], float]:
        if self.kind == "macs":
            return lambda a: float(analytic_cost(a).macs)
        if self.kind == "params":
            return lambda a: float(analytic_cost(a).params)
        return lambda a: float(predict_latency_ms(a, self.profile))

    def absolute(self, arch: Architecture) -> float:
        """The target in the cost's own unit for `arch` (fractions times the original's cost)."""
        return self.value if self.kind == "latency_ms" else self.value * self.cost_fn()(arch)

    def label(self) -> str:
        return f"{self.kind}{'@' + self.profile if self.profile else ''}={self.value:g}"


def agp_fractions(final: float, steps: int) -> list[float]:
    """Automated gradual pruning (Zhu & Gupta 2017): the fraction kept after each of `steps` steps,
    1 - (1 - final) * (1 - (1 - t/steps)^3): large cuts first, small ones near the end."""
    if steps < 1:
        raise NasError(f"prune.steps: {steps!r}; allowed an integer >= 1")
    return [1 - (1 - final) * (1 - (1 - t / steps) ** 3) for t in range(1, steps + 1)]


def prune(arch: Architecture, variables: Mapping[str, Any], target: float,
          cost: Callable[[Architecture], float], criterion: str = "l1", *, grads: Any = None,
          key: str | None = None, min_keep: float = 0.0, divisor: int = 1,
          cost_aware: bool = False) -> tuple[Architecture, dict[str, Any], dict[str, np.ndarray]]:
    """One-shot prune `arch` to `cost(pruned) <= target` by `criterion`.

    Returns (pruned architecture with `key` (default: the original's), its sliced variables, the
    kept channel indices per group)."""
    scores = importance(arch, variables, criterion, grads)
    keep, pruned = select(arch, scores, cost, target, min_keep=min_keep, divisor=divisor, cost_aware=cost_aware)
    if key:
        pruned = dataclasses.replace(pruned, key=key)
    return pruned, slice_variables(arch, variables, keep), keep


def pruned_key(original: str, fraction: float) -> str:
    """'KEY~pF': the key of `original` pruned to keep `fraction` of its target cost."""
    return f"{original.split('~')[0]}~p{fraction:.2f}"


def uniform_architecture(arch: Architecture, cost: Callable[[Architecture], float], target: float,
                         divisor: int = 1) -> Architecture:
    """The baseline pruning is judged against: every width of `arch` scaled by one factor (the
    largest, to 1/256, whose network costs at most `target`), with the original key and fresh
    weights to train. Raises NasError if one channel per group already costs more."""
    groups = channel_groups(arch)

    def at(s: float) -> Architecture:
        return pruned_architecture(arch, fix_counts(arch, {n: max(1, round(s * g.width)) for n, g in groups.items()},
                                                    divisor))

    if cost(at(0.0)) > target:
        raise NasError(f"prune: target {target:g} is below the smallest reachable {cost(at(0.0)):g}")
    lo, hi = 0, 256  # s = k / 256; at(lo) meets the target
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(at(mid / 256)) <= target:
            lo = mid
        else:
            hi = mid - 1
    return at(lo / 256)


def recalibrate_bn(arch: Architecture, variables: Mapping[str, Any], x: np.ndarray, *, batch_size: int = 256,
                   batches: int = 8, seed: int = 0) -> dict[str, Any]:
    """`variables` with BatchNorm running statistics re-estimated on rows of `x` (training-mode
    forward passes, weights unchanged). Removing a layer's input channels shifts the statistics
    of its output, and the stale ones of the unpruned network left a one-shot pruned network at
    chance accuracy before any fine-tuning."""
    import jax
    import jax.numpy as jnp


    net = build_model(arch, "fast")

    @jax.jit
    def update(v, xb, key):
        _, new = net.apply(v, xb, train=True, mutable=["batch_stats"], rngs={"dropout": key})
        return {"params": v["params"], "batch_stats": new["batch_stats"]}

    v = jax.tree.map(jnp.asarray, {"params": variables["params"], "batch_stats": variables["batch_stats"]})
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    for b in range(batches):
        idx = rng.choice(len(x), min(batch_size, len(x)), replace=False)
        v = update(v, jnp.asarray(x[idx]), jax.random.fold_in(key, b))
    return jax.tree.map(np.asarray, v)
