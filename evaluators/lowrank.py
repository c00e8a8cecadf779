"""Low-rank factorization: split 1x1 convolutions and the classifier into two thinner layers by truncated SVD.

A 1x1 convolution is a matrix W (cin x cout) applied at every pixel. Its best rank-r approximation
(Eckart-Young) is U_r S_r V_r^T from the SVD; the layer becomes `down` = U_r S_r^1/2 (cin -> r, no
bias, no BatchNorm, carrying the stride) followed by `up` = S_r^1/2 V_r^T (r -> cout) with the
original's BatchNorm (or bias, for the classifier). It is cheaper exactly when r (cin + cout) <
cin cout, in parameters and in MACs alike; a layer whose rank does not meet that is left whole.

Sites (`sites`): the `mb` expand and project convs, the `ds` pointwise conv, a skip layer's 1x1
shortcut, the head's 1x1 conv and the classifier. Depthwise and k x k convolutions are left alone.

What is approximated is the layer's output after its BatchNorm (evaluation mode), W diag(k) with
k = |gamma| / sqrt(var + eps): an output channel that BatchNorm scales down matters less. The SVD is
of that matrix and `up` is divided by k again, so the BatchNorm still applies it (k is floored at
1e-3 of its largest value so no division blows up). Training-mode BatchNorm is invariant to a
per-channel scale of its input, so fine-tuning sees the same network.

Rank per layer (`LowRankTarget`): 'energy=F', the smallest rank keeping a fraction F of the
squared singular values (of the matrix above); or 'params=F' / 'macs=F', one energy threshold for
every layer, the largest (searched over every threshold at which some layer's rank changes) whose
network keeps at most F of the original's parameters / MACs.

The factorized network is an `Architecture` whose layers carry `ranks` ({conv name: rank} in its
JSON), with the key `ORIGINAL_KEY~lrF` (F: the fraction of parameters kept), built, costed,
exported and loaded like any other.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from evaluators.cost import analytic_cost
from evaluators.onnx_export import function_to_onnx, ort_session, random_variables
from evaluators.signatures import LayerSig, LayerUnit, arch_signatures
from evaluators.timing import measure_passes
from search_spaces.architecture import Architecture
from search_spaces.errors import NasError
from search_spaces.graph import layer_names
from search_spaces.model import BN_EPS

TARGET_KINDS = ("energy", "params", "macs")
DEFAULT = "energy=0.9"
K_FLOOR = 1e-3


@dataclass(frozen=True)
class Site:
    """One factorizable layer: `owner` is a layer index or 'head'; `path` the module path in the
    params tree; `dense` for the classifier."""

    owner: int | str
    name: str
    cin: int
    cout: int
    path: tuple[str, ...]
    dense: bool = False

    def pays(self, rank: int) -> bool:
        """True when rank `rank` costs fewer weights (and MACs) than the whole layer."""
        return rank * (self.cin + self.cout) < self.cin * self.cout

    def label(self) -> str:
        return f"{self.owner if self.owner == 'head' else f'layer{self.owner}'}.{self.name}"


def sites(arch: Architecture) -> list[Site]:
    """Every 1x1 conv and the classifier of `arch`, in network order (already factorized ones included)."""
    out = [Site(i, name, cin, cout, (f"layer{i}", name))
           for i, ly in enumerate(arch.layers) for name, (cin, cout) in ly.conv_shapes().items()]
    cin = arch.layers[-1].out_channels if arch.layers else arch.stem.channels
    out.append(Site("head", "conv", cin, arch.head.channels, ("head",)))
    out.append(Site("head", "classifier", arch.head.channels, arch.num_classes, ("classifier",), dense=True))
    return out


# ============================================================ targets
@dataclass(frozen=True)
class LowRankTarget:
    """How ranks are chosen: `kind` energy|params|macs, `value` a fraction in (0, 1]."""

    kind: str
    value: float

    @classmethod
    def parse(cls, spec: Any, where: str = "--lowrank") -> "LowRankTarget":
        """True (the default, 'energy=0.9'), 'energy=F', 'params=F' or 'macs=F' with F in (0, 1]."""
        allowed = "energy=F (fraction of squared singular values kept), params=F or macs=F (fraction kept), F in (0, 1]"
        text = DEFAULT if spec is True else spec
        if not isinstance(text, str):
            raise NasError(f"{where}: {spec!r}; allowed true or {allowed}")
        name, sep, val = text.partition("=")
        if name.strip() not in TARGET_KINDS or not sep:
            raise NasError(f"{where}: unknown key '{name.strip()}'; allowed {allowed}")
        try:
            value = float(val)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and 0 < value <= 1):
            raise NasError(f"{where}: {name.strip()}={val.strip()}; allowed a fraction in (0, 1]")
        return cls(name.strip(), value)

    def label(self) -> str:
        return f"{self.kind}={self.value:g}"


# ============================================================ spectra and ranks
def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _output_scale(site: Site, variables: Mapping[str, Any]) -> np.ndarray:
    """k per output channel: |gamma| / sqrt(var + eps) of the site's BatchNorm (1 for the classifier),
    floored at K_FLOOR of its largest value."""
    if site.dense:
        return np.ones(site.cout, np.float64)
    bn = _get(variables["params"], site.path)["bn"]
    var = np.asarray(_get(variables["batch_stats"], site.path)["bn"]["var"], np.float64)
    k = np.abs(np.asarray(bn["scale"], np.float64)) / np.sqrt(var + BN_EPS)
    return np.maximum(k, K_FLOOR * max(float(k.max()), 1e-30))


def _matrix(site: Site, variables: Mapping[str, Any]) -> np.ndarray:
    kernel = np.asarray(_get(variables["params"], site.path)["kernel"], np.float64)
    return kernel.reshape(site.cin, site.cout)


def _svd(site: Site, variables: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(U, S, Vt, k) of W diag(k)."""
    k = _output_scale(site, variables)
    u, s, vt = np.linalg.svd(_matrix(site, variables) * k, full_matrices=False)
    return u, s, vt, k


def energy_rank(s: np.ndarray, energy: float) -> int:
    """The smallest rank whose singular values keep at least `energy` of sum(s^2) (at least 1)."""
    cum = np.cumsum(np.asarray(s, np.float64) ** 2)
    if cum[-1] <= 0:
        return 1
    # float rounding: a tolerance of a few ulps of the total, so energy=1 gives the full rank, not more
    return int(min(len(s), 1 + np.searchsorted(cum / cum[-1], energy - 1e-12)))


def spectra(arch: Architecture, variables: Mapping[str, Any]) -> dict[Site, np.ndarray]:
    """The singular values of every unfactorized site of `arch` (see the module docstring)."""
    done = {(i, n) for i, ly in enumerate(arch.layers) for n, _ in ly.ranks} | {("head", n) for n, _ in arch.head.ranks}
    return {st: _svd(st, variables)[1] for st in sites(arch) if (st.owner, st.name) not in done}


def round_rank(r: int, site: Site, divisor: int = 1) -> int:
    """`r` rounded up to a multiple of `divisor`, at most the full rank min(cin, cout)."""
    return min(-(-r // divisor) * divisor, site.cin, site.cout)


def ranks_at(spec: Mapping[Site, np.ndarray], energy: float, divisor: int = 1) -> dict[Site, int]:
    """The sites that pay off at one energy threshold, with their ranks (rounded up to multiples of
    `divisor`: ONNX Runtime's blocked NCHWc kernels want channel counts that are multiples of 8 or
    16; on mobile_small layers, rounding moved factorized one-layer speedups from 0.84-0.94 to
    1.00-1.04, see docs/compress.md)."""
    out = {}
    for st, s in spec.items():
        r = round_rank(energy_rank(s, energy), st, divisor)
        if st.pays(r):
            out[st] = r
    return out


def factorized_architecture(arch: Architecture, ranks: Mapping[Site, int], key: str | None = None) -> Architecture:
    """`arch` with each site in `ranks` factorized at its rank (ranks already present are kept)."""
    by_owner: dict[int | str, dict[str, int]] = {}
    for st, r in ranks.items():
        by_owner.setdefault(st.owner, {})[st.name] = int(r)
    layers = []
    for i, ly in enumerate(arch.layers):
        new = {**dict(ly.ranks), **by_owner.get(i, {})}
        order = list(ly.conv_shapes())
        layers.append(dataclasses.replace(ly, ranks=tuple((n, new[n]) for n in order if n in new)) if new else ly)
    head = {**dict(arch.head.ranks), **by_owner.get("head", {})}
    head_ranks = tuple((n, head[n]) for n in ("conv", "classifier") if n in head)
    out = dataclasses.replace(arch, key=key or arch.key, layers=tuple(layers),
                              head=dataclasses.replace(arch.head, ranks=head_ranks))
    out.validate()
    return out


def choose_ranks(arch: Architecture, variables: Mapping[str, Any], target: LowRankTarget,
                 divisor: int = 1) -> dict[Site, int]:
    """The ranks for `target`, multiples of `divisor` (only sites where the factorization costs less
    than the whole layer).

    Raises NasError when a params/macs target is below what the least rank in every layer reaches."""
    spec = spectra(arch, variables)
    if target.kind == "energy":
        return ranks_at(spec, target.value, divisor)
    cost: Callable[[Architecture], float] = (lambda a: float(getattr(analytic_cost(a), target.kind)))
    budget = target.value * cost(arch)
    # every threshold at which some site's rank changes, ascending; the cost grows with the threshold
    cuts = sorted({float(c) for s in spec.values() for c in np.cumsum(s ** 2) / max(np.sum(s ** 2), 1e-300)})
    cuts = [c for c in cuts if c > 0] or [1.0]

    def at(e: float) -> float:
        return cost(factorized_architecture(arch, ranks_at(spec, e, divisor)))

    check_reachable(arch, target, divisor=divisor)
    lo, hi = 0, len(cuts) - 1  # at(cuts[lo]) meets the budget
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if at(cuts[mid]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return ranks_at(spec, cuts[lo], divisor)


def floor_fraction(arch: Architecture, kind: str, divisor: int = 1) -> float:
    """The `kind` (params|macs) of `arch` with every unfactorized site at its least rank (`divisor`,
    where that is cheaper than whole), as a fraction of its own."""
    done = {(i, n) for i, ly in enumerate(arch.layers) for n, _ in ly.ranks} | {("head", n) for n, _ in arch.head.ranks}
    least = factorized_architecture(arch, {st: round_rank(1, st, divisor) for st in sites(arch)
                                           if (st.owner, st.name) not in done and st.pays(round_rank(1, st, divisor))})
    return getattr(analytic_cost(least), kind) / getattr(analytic_cost(arch), kind)


def check_reachable(arch: Architecture, target: LowRankTarget, where: str = "compress.lowrank",
                    divisor: int = 1) -> None:
    """Raise NasError when a params/macs target is below what the least rank in every layer reaches."""
    if target.kind == "energy":
        return
    least = floor_fraction(arch, target.kind, divisor)
    if target.value < least:
        rank = "rank 1" if divisor == 1 else f"rank {divisor} (compress.divisor)"
        raise NasError(f"{where}: {target.label()} is below what {rank} in every layer reaches for "
                       f"'{arch.key}'; allowed {target.kind} >= {math.ceil(least * 1000) / 1000:g}")


# ============================================================ measured latency per layer
def _unit_maker(sig: LayerSig, batch: int) -> Callable[[], Callable[[], Any]]:
    """A maker of a callable running the one-layer ONNX model of `sig` at `batch` (ONNX Runtime, one
    thread; NCHW inside the network, as `evaluators.timing.unit_callable` exports units)."""
    unit = LayerUnit(sig, "reference")
    variables = random_variables(unit, sig.in_shape())
    nchw_in, nchw_out = sig.part != "stem", sig.part != "head"
    model = function_to_onnx(lambda x: unit.apply(variables, x), sig.in_shape(), nchw_in=nchw_in,
                             nchw_out=nchw_out, name="unit")
    r, c = sig.resolution, sig.in_channels
    x = np.random.default_rng(0).standard_normal((batch, c, r, r) if nchw_in else (batch, r, r, c)).astype(np.float32)

    def make() -> Callable[[], Any]:
        sess = ort_session(model, threads=1)
        feed = {sess.get_inputs()[0].name: x}
        return lambda: sess.run(None, feed)

    return make


def measure_layers(arch: Architecture, small: Architecture, budget_s: float) -> list[dict[str, Any]]:
    """Every layer of `small` factorized where `arch` is not: its one-layer ONNX Runtime model whole
    and factorized, at batch 1 and 32, all figures interleaved (`measure_passes`); one record per
    layer: {'layer', 'index' (of `layer_names`), 'ms': {'whole'|'factorized': {'batch1', 'batch32'}},
    'speedup': {'batch1', 'batch32'}}."""
    names = layer_names(small)
    pairs = [(i, b, a) for i, (b, a) in enumerate(zip(arch_signatures(arch), arch_signatures(small))) if a != b]
    makers, which = [], []
    for i, b, a in pairs:
        for form, sig in (("whole", b), ("factorized", a)):
            for batch in (1, 32):
                makers.append(_unit_maker(sig, batch))
                which.append((i, form, f"batch{batch}"))
    out: dict[int, dict[str, Any]] = {i: {"layer": names[i], "index": i, "ms": {}} for i, _, _ in pairs}
    for (i, form, bk), ms in zip(which, measure_passes(makers, 1, budget_s)):
        out[i]["ms"].setdefault(form, {})[bk] = ms
    for rec in out.values():
        rec["speedup"] = {bk: rec["ms"]["whole"][bk] / rec["ms"]["factorized"][bk] for bk in ("batch1", "batch32")}
    return list(out.values())


def site_index(site: Site, arch: Architecture) -> int:
    """The index in `layer_names(arch)` / `arch_signatures(arch)` of the layer holding `site`."""
    return len(arch.layers) + 1 if site.owner == "head" else int(site.owner) + 1


# ============================================================ weights
def _copy(tree: Any) -> Any:
    return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, Mapping) else np.asarray(tree)


def factorize_variables(arch: Architecture, variables: Mapping[str, Any], ranks: Mapping[Site, int]) -> dict[str, Any]:
    """The variables of `factorized_architecture(arch, ranks)`: each site's kernel replaced by its
    truncated SVD factors ('down' {'kernel'} and the module's own 'kernel'); BatchNorm, biases and
    every other weight unchanged."""
    params, stats = _copy(variables["params"]), _copy(variables.get("batch_stats", {}))
    for st, r in ranks.items():
        u, s, vt, k = _svd(st, variables)
        root = np.sqrt(s[:r])
        down, up = u[:, :r] * root, (root[:, None] * vt[:r]) / k
        mod = _get(params, st.path)
        dtype = np.asarray(mod["kernel"]).dtype
        shape = ((st.cin, r), (r, st.cout)) if st.dense else ((1, 1, st.cin, r), (1, 1, r, st.cout))
        mod["down"] = {"kernel": down.reshape(shape[0]).astype(dtype)}
        mod["kernel"] = up.reshape(shape[1]).astype(dtype)
    return {"params": params, "batch_stats": stats}


def lowrank_key(original: str, fraction: float) -> str:
    """'KEY~lrF': `original` (possibly already '~p' pruned) factorized to keep `fraction` of its parameters."""
    return f"{original}~lr{fraction:.2f}"


def factorize(arch: Architecture, variables: Mapping[str, Any], target: LowRankTarget | Mapping[Site, int],
              divisor: int = 1) -> tuple[Architecture, dict[str, Any], list[dict[str, Any]]]:
    """Factorize `arch` for `target` (ranks multiples of `divisor`), or at explicit per-site ranks.

    Returns (factorized architecture keyed 'KEY~lrF', its variables, one record per site:
    {'layer', 'cin', 'cout', 'full_rank', 'rank' (None: left whole), 'energy' kept at that rank})."""
    spec = spectra(arch, variables)
    ranks = dict(target) if isinstance(target, Mapping) else choose_ranks(arch, variables, target, divisor)
    small = factorized_architecture(arch, ranks)
    frac = analytic_cost(small).params / analytic_cost(arch).params
    small = dataclasses.replace(small, key=lowrank_key(arch.key, frac))
    records = []
    for st, s in spec.items():
        r = ranks.get(st)
        e = float(np.sum(s[:r] ** 2) / max(np.sum(s ** 2), 1e-300)) if r else 1.0
        records.append({"layer": st.label(), "cin": st.cin, "cout": st.cout, "full_rank": min(st.cin, st.cout),
                        "rank": r, "energy": e})
    return small, factorize_variables(arch, variables, ranks), records
