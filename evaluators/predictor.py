"""Accuracy predictor: an MLP on a candidate's encoding, trained on measured (key, accuracy) pairs.

Once-for-All's accuracy predictor (Cai et al. 2020): the candidate is encoded as the one-hot
option of every decision of its space plus features the options share (`Encoding`; a layer
beyond its stage's depth is all zeros), and a small MLP regresses the measured accuracy. Here the MLP is trained with Optax (Adam, full batch,
one compiled `lax.scan` over the steps) on the normal scores of the accuracies' ranks
(`target='rank'`, MSE: a few broken candidates far below the rest do not dominate the loss), on the
order of every pair of measured candidates (`target='pairs'`, RankNet's logistic loss, Burges et al.
2005: only the order is learnt, which is what a search uses) or on standardised accuracies
(`target='standard'`, MSE). With 'rank' and 'pairs' predictions are mapped back to accuracy through
the training quantiles. The predictor is an ensemble of a few
members (vmapped, different initialisations) whose mean is the prediction: on a few hundred
measurements an ensemble ranks held-out candidates more steadily than one network. Predicting
is one jitted forward pass per chunk of candidates, so a search can score hundreds of thousands
of candidates per minute and keep the measured score (supernet or training) for the best few.

Example:
    >>> pred = fit_predictor(space, keys, accuracies)
    >>> pred.predict(other_keys)            # np.ndarray of predicted accuracies
    >>> pred.evaluate(held_out, measured)   # {'kendall_tau': ..., 'rmse': ..., 'n': ...}
    >>> pred.save("predictor.msgpack"); load_predictor("predictor.msgpack", space)
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from search_spaces.architecture import Architecture
from search_spaces.errors import NasError
from search_spaces.space import ALPHABET, INACTIVE, SearchSpace

FORMAT_VERSION = 1
PREDICT_CHUNK = 16_384  # most candidates per compiled forward call
PREDICT_MIN = 256  # calls are padded to a power of two in [PREDICT_MIN, PREDICT_CHUNK]: at most 7 compiles


# ==================================================================== encoding
@dataclass(frozen=True)
class Encoding:
    """Column layout of a space's encoding: per decision, the one-hot of its option, then features
    shared between options (OFA encodes kernel and expansion per layer the same way): for a layer's
    op, one-hots of its block type, kernel, expansion and squeeze-and-excite; for an ordered numeric
    choice (channels, depth, width, resolution), a thermometer code (option i sets the first i
    columns). Shared features let a few hundred measurements inform options seen rarely."""

    space: str
    names: tuple[str, ...]
    sizes: tuple[int, ...]
    tables: tuple[tuple[tuple[float, ...], ...], ...]  # per decision: one row of columns per option

    @classmethod
    def of(cls, space: SearchSpace) -> "Encoding":
        decisions = space.decisions()
        return cls(space.name, tuple(d.name for d in decisions), tuple(len(d.options) for d in decisions),
                   tuple(_option_table(d.options) for d in decisions))

    @property
    def width(self) -> int:
        return int(sum(len(t[0]) for t in self.tables))

    def encode(self, keys: Sequence[str | Architecture]) -> np.ndarray:
        """(n, width) float32 rows; '-' (an inactive layer) leaves its decision's columns at zero.

        Keys are taken as given (canonical keys of the space, e.g. from `SearchSpace.sample`);
        a key of the wrong length or with an out-of-range character raises `NasError`.
        """
        keys = [k.key if isinstance(k, Architecture) else k for k in keys]
        n, d = len(keys), len(self.sizes)
        if n == 0 or d == 0:
            return np.zeros((n, self.width), np.float32)
        if any(len(k) != d for k in keys):
            bad = next(k for k in keys if len(k) != d)
            raise NasError(f"predictor for space '{self.space}': key {bad!r} has {len(bad)} characters, "
                           f"expected {d} (one per decision)")
        codes = np.frombuffer("".join(keys).encode("ascii", "replace"), np.uint8).reshape(n, d)
        idx = _CHAR_INDEX[codes]
        sizes = np.asarray(self.sizes)
        bad = (idx >= sizes) & (idx != _INACTIVE_CODE) | (idx < 0)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise NasError(f"predictor for space '{self.space}': key {keys[r]!r} position {c} ({self.names[c]}) "
                           f"is {keys[r][c]!r}; allowed '0'..'{ALPHABET[sizes[c] - 1]}' or '-'")
        blocks = []
        for j, table in enumerate(self.tables):
            t = np.vstack([np.asarray(table, np.float32), np.zeros((1, len(table[0])), np.float32)])
            col = np.where(idx[:, j] == _INACTIVE_CODE, len(table), idx[:, j])  # the zero row for '-'
            blocks.append(t[col])
        return np.concatenate(blocks, axis=1)


def _option_table(options: Sequence[Any]) -> tuple[tuple[float, ...], ...]:
    """Rows (one per option): one-hot, then the shared features described in `Encoding`."""
    n = len(options)
    onehot = np.eye(n, dtype=np.float32)
    if all(isinstance(o, (int, float)) and not isinstance(o, bool) for o in options):
        order = np.argsort(np.argsort(np.asarray(options, np.float64)))
        thermo = (np.arange(n - 1)[None, :] < order[:, None]).astype(np.float32)
        rows = np.concatenate([onehot, thermo], axis=1)
    elif all(hasattr(o, "block") for o in options):
        feats = []
        for attr in ("block", "kernel", "expansion", "se"):
            values = sorted({getattr(o, attr) for o in options}, key=str)
            if len(values) > 1:
                feats.append(np.array([[float(getattr(o, attr) == v) for v in values] for o in options], np.float32))
        rows = np.concatenate([onehot, *feats], axis=1)
    else:
        rows = onehot
    return tuple(tuple(float(v) for v in r) for r in rows)


_INACTIVE_CODE = 255
_CHAR_INDEX = np.full(256, -1, np.int64)
for _i, _c in enumerate(ALPHABET):
    _CHAR_INDEX[ord(_c)] = _i
_CHAR_INDEX[ord(INACTIVE)] = _INACTIVE_CODE


# ==================================================================== the model
@dataclass(frozen=True)
class PredictorConfig:
    """How the predictor is trained. Defaults: OFA's 3 x 400 hidden units, an ensemble of 4."""

    hidden: tuple[int, ...] = (400, 400, 400)
    members: int = 4
    steps: int = 500
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    # 'rank': regress normal scores of the accuracies' ranks; 'standard': standardised accuracies. Fit
    # on 800 mnist5k supernet scores, held-out Kendall tau on 200 with 'rank' 0.809 / 0.801 / 0.765 /
    # 0.743 against 0.790 / 0.793 / 0.734 / 0.743 with 'standard' (four supernets, docs/supernet.md).
    # 'pairs' (the default): the order of every pair. Two more supernets, 5 random splits each, 200
    # held out: mean tau fit on 300 0.759 / 0.766 against 0.743 / 0.745 with 'rank', on 800 0.802 /
    # 0.813 against 0.796 / 0.799; better on 19 of the 20 splits (docs/supernet.md).
    target: str = "pairs"

    def __post_init__(self) -> None:
        ok_int = lambda v, low: isinstance(v, int) and not isinstance(v, bool) and v >= low
        if not isinstance(self.hidden, tuple) or not self.hidden or not all(ok_int(h, 1) for h in self.hidden):
            raise NasError(f"predictor.hidden: {self.hidden!r}; allowed a non-empty list of integers >= 1")
        for k in ("members", "steps"):
            if not ok_int(getattr(self, k), 1):
                raise NasError(f"predictor.{k}: {getattr(self, k)!r}; allowed an integer >= 1")
        if not ok_int(self.seed, 0):
            raise NasError(f"predictor.seed: {self.seed!r}; allowed an integer >= 0")
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise NasError(f"predictor.learning_rate: {self.learning_rate!r}; allowed a number > 0")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise NasError(f"predictor.weight_decay: {self.weight_decay!r}; allowed a number >= 0")
        if self.target not in TARGETS:
            raise NasError(f"predictor.target: {self.target!r}; allowed {', '.join(TARGETS)}")


TARGETS = ("rank", "standard", "pairs")
PAIR_ROWS = 1024  # 'pairs' with more measurements: each step compares a random subset of this many


def _normal_scores(y: np.ndarray) -> np.ndarray:
    """Normal quantiles of the (average, for ties) ranks of y: Phi^-1((rank - 0.5) / n)."""
    from scipy.stats import norm, rankdata

    return norm.ppf((rankdata(y) - 0.5) / len(y))


def _from_quantiles(z: np.ndarray, zq: np.ndarray, yq: np.ndarray) -> np.ndarray:
    """Map predicted normal scores back to accuracy: piecewise linear through the training
    (score, accuracy) pairs, extended linearly past both ends (slope over the last ~5% of them) so
    candidates predicted beyond the best measured one keep their order instead of tying."""
    out = np.interp(z, zq, yq)
    if len(zq) < 2:
        return out
    k = max(1, len(zq) // 20)
    lo, hi = (yq[k] - yq[0]) / (zq[k] - zq[0]), (yq[-1] - yq[-1 - k]) / (zq[-1] - zq[-1 - k])
    out = np.where(z > zq[-1], yq[-1] + (z - zq[-1]) * hi, out)
    return np.where(z < zq[0], yq[0] + (z - zq[0]) * lo, out)


def _order_quantiles(f: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct sorted predictions, the accuracy of the same rank): the monotone map that sends the
    training predictions onto the training accuracies' distribution."""
    fs, ys = np.sort(f), np.sort(y)
    fq, first = np.unique(fs, return_index=True)
    return fq, ys[first]


def _init_member(key: jax.Array, sizes: tuple[int, ...]) -> list[dict[str, jax.Array]]:
    """He-normal weights, zero biases, for layers sizes[0] -> sizes[1] -> ... -> 1."""
    layers = []
    dims = (*sizes, 1)
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        key, sub = jax.random.split(key)
        scale = jnp.sqrt(2.0 / max(a, 1)) if i < len(dims) - 2 else jnp.sqrt(1.0 / max(a, 1))
        layers.append({"w": jax.random.normal(sub, (a, b), jnp.float32) * scale, "b": jnp.zeros((b,), jnp.float32)})
    return layers


def _forward(layers: list[dict[str, jax.Array]], x: jax.Array) -> jax.Array:
    for layer in layers[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return (x @ layers[-1]["w"] + layers[-1]["b"])[..., 0]


def _ensemble_forward(params: Any, x: jax.Array) -> jax.Array:
    """(members, n) predictions on standardised scale."""
    return jax.vmap(_forward, in_axes=(0, None))(params, x)


def _pair_loss(f: jax.Array, y: jax.Array) -> jax.Array:
    """RankNet's loss per member: mean over the pairs with y_i > y_j of log(1 + exp(f_j - f_i))
    (f: (members, n) predictions, y: (n,) targets; tied targets carry no order and are left out)."""
    better = (y[:, None] > y[None, :]).astype(f.dtype)
    d = f[:, :, None] - f[:, None, :]
    return jnp.sum(better * jax.nn.softplus(-d), axis=(1, 2)) / jnp.maximum(jnp.sum(better), 1.0)


@functools.partial(jax.jit, static_argnames=("steps", "lr", "wd", "loss", "pair_rows"))
def _fit(params: Any, x: jax.Array, y: jax.Array, *, steps: int, lr: float, wd: float,
         loss: str, key: jax.Array, pair_rows: int) -> tuple[Any, jax.Array]:
    """`steps` AdamW steps for every ensemble member, of MSE (full batch) or of the pair loss (all
    pairs, or those among `pair_rows` random rows per step, drawn with `key`, when there are more);
    returns (params, loss per step)."""
    tx = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=wd)
    opt = tx.init(params)
    n = x.shape[0]
    rows = min(n, pair_rows)

    def loss_fn(p, k):
        if loss == "mse":
            return jnp.mean((_ensemble_forward(p, x) - y[None, :]) ** 2)
        if rows == n:
            return jnp.mean(_pair_loss(_ensemble_forward(p, x), y))
        pick = jax.random.permutation(k, n)[:rows]
        return jnp.mean(_pair_loss(_ensemble_forward(p, x[pick]), y[pick]))

    def step(carry, k):
        p, o = carry
        value, g = jax.value_and_grad(loss_fn)(p, k)
        updates, o = tx.update(g, o, p)
        return (optax.apply_updates(p, updates), o), value

    keys = jax.random.split(key, steps)
    (params, _), losses = jax.lax.scan(step, (params, opt), keys)
    return params, losses


@jax.jit
def _predict_chunk(params: Any, x: jax.Array) -> jax.Array:
    return jnp.mean(_ensemble_forward(params, x), axis=0)


def _raw_predictions(params: Any, x: np.ndarray) -> np.ndarray:
    """The ensemble's mean output for encoded rows `x`, on the scale it was trained on, as float64."""
    out = np.empty(len(x), np.float64)
    for lo in range(0, len(x), PREDICT_CHUNK):
        chunk = x[lo: lo + PREDICT_CHUNK]
        rows = max(PREDICT_MIN, 1 << (len(chunk) - 1).bit_length())  # few shapes -> few compiles
        padded = np.zeros((rows, x.shape[1]), np.float32)
        padded[: len(chunk)] = chunk
        out[lo: lo + len(chunk)] = np.asarray(_predict_chunk(params, padded))[: len(chunk)]
    return out


class Predictor:
    """A trained accuracy predictor for one search space (see the module docstring)."""

    def __init__(self, encoding: Encoding, cfg: PredictorConfig, params: Any, mean: float, std: float,
                 n_train: int = 0, final_loss: float = float("nan"),
                 quantiles: tuple[np.ndarray, np.ndarray] | None = None):
        self.encoding, self.cfg, self.params = encoding, cfg, params
        self.mean, self.std = float(mean), float(std)
        self.n_train, self.final_loss = int(n_train), float(final_loss)
        # target 'rank' / 'pairs': the training (normal score / prediction, accuracy) pairs, distinct and increasing
        self.quantiles = None if quantiles is None else tuple(np.asarray(q, np.float64) for q in quantiles)

    def predict(self, keys: Sequence[str | Architecture]) -> np.ndarray:
        """Predicted accuracy (the scale of the training targets) for each key, as float64."""
        z = _raw_predictions(self.params, self.encoding.encode(keys))
        return z * self.std + self.mean if self.quantiles is None else _from_quantiles(z, *self.quantiles)

    def evaluate(self, keys: Sequence[str | Architecture], measured: Sequence[float]) -> dict[str, float]:
        """Kendall tau and RMSE of the predictions against `measured` (e.g. held-out supernet scores)."""
        return rank_agreement(self.predict(keys), measured)

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """Write the predictor (weights and what is needed to check and rebuild it) to one msgpack file."""
        path = Path(path)
        meta = {"version": FORMAT_VERSION, "encoding": asdict(self.encoding), "config": asdict(self.cfg),
                "mean": self.mean, "std": self.std, "n_train": self.n_train, "final_loss": self.final_loss,
                "quantiles": None if self.quantiles is None else [q.tolist() for q in self.quantiles]}
        blob = serialization.msgpack_serialize({"meta": json.dumps(meta),
                                                "params": jax.tree.map(np.asarray, self.params)})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(blob)
        tmp.replace(path)
        return path


def rank_agreement(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, float]:
    """{'kendall_tau', 'rmse', 'n'} between two aligned score vectors."""
    from scipy.stats import kendalltau

    p, m = np.asarray(predicted, np.float64), np.asarray(measured, np.float64)
    if p.shape != m.shape or p.ndim != 1:
        raise NasError(f"rank_agreement: {p.shape} predictions against {m.shape} measurements")
    tau = float(kendalltau(p, m).statistic) if len(p) > 1 else float("nan")
    return {"kendall_tau": tau, "rmse": float(np.sqrt(np.mean((p - m) ** 2))) if len(p) else float("nan"),
            "n": int(len(p))}


def fit_predictor(space: SearchSpace, keys: Sequence[str | Architecture], accuracies: Sequence[float],
                  cfg: PredictorConfig | None = None) -> Predictor:
    """Train a predictor on measured (candidate, accuracy) pairs of `space`.

    Args:
        space: the search space the keys belong to.
        keys: architecture keys (or `Architecture` values) that were measured.
        accuracies: their measured accuracies (any scale; predictions come back on that scale).
        cfg: training settings (default `PredictorConfig()`).

    Returns:
        A `Predictor`; its `final_loss` is the last training MSE on the regressed scale.

    Raises:
        NasError: fewer than 2 measurements, mismatched lengths, non-finite accuracies, or keys
        that are not of this space.
    """
    cfg = cfg or PredictorConfig()
    y = np.asarray(accuracies, np.float64)
    if len(keys) != len(y):
        raise NasError(f"fit_predictor: {len(keys)} keys but {len(y)} accuracies")
    if len(y) < 2:
        raise NasError(f"fit_predictor: needs at least 2 measured candidates, got {len(y)}")
    if not np.all(np.isfinite(y)):
        raise NasError("fit_predictor: accuracies must be finite numbers")
    enc = Encoding.of(space)
    x = enc.encode(keys)
    mean, std = float(y.mean()), float(y.std()) or 1.0
    # 'rank' regresses the normal scores; 'pairs' uses only their order (tied accuracies share a score)
    z = _normal_scores(y) if cfg.target != "standard" else (y - mean) / std
    inits = jax.random.split(jax.random.PRNGKey(cfg.seed), cfg.members)
    key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), cfg.members)  # 'pairs': the rows compared per step
    params = jax.vmap(lambda k: _init_member(k, (enc.width, *cfg.hidden)))(inits)
    params, losses = _fit(params, jnp.asarray(x), jnp.asarray(z, np.float32), steps=cfg.steps,
                          lr=float(cfg.learning_rate), wd=float(cfg.weight_decay),
                          loss="pairs" if cfg.target == "pairs" else "mse", key=key, pair_rows=PAIR_ROWS)
    params = jax.tree.map(np.asarray, params)
    quantiles = None
    if cfg.target == "rank":
        zq, first = np.unique(z, return_index=True)
        quantiles = (zq, y[first])
    elif cfg.target == "pairs":  # the scale is free: match the training predictions' order to the accuracies'
        quantiles = _order_quantiles(_raw_predictions(params, x), y)
    return Predictor(enc, cfg, params, mean, std, n_train=len(y), final_loss=float(losses[-1]), quantiles=quantiles)


def load_predictor(path: str | Path, space: SearchSpace | None = None) -> Predictor:
    """Read a predictor written by `Predictor.save`; with `space`, refuse one trained on another space."""
    path = Path(path)
    if not path.is_file():
        raise NasError(f"{path}: no predictor file")
    try:
        doc = serialization.msgpack_restore(path.read_bytes())
        meta = json.loads(doc["meta"])
        e = meta["encoding"]
        enc = Encoding(e["space"], tuple(e["names"]), tuple(e["sizes"]),
                       tuple(tuple(tuple(r) for r in t) for t in e["tables"]))
        # files written before `target` existed regressed standardised accuracies
        cfg = PredictorConfig(**{"target": "standard", **meta["config"], "hidden": tuple(meta["config"]["hidden"])})
    except (ValueError, KeyError, TypeError) as e:
        raise NasError(f"{path}: not a predictor file ({type(e).__name__})") from None
    if meta.get("version") != FORMAT_VERSION:
        raise NasError(f"{path}: predictor format {meta.get('version')!r}, allowed {FORMAT_VERSION}")
    if space is not None and Encoding.of(space) != enc:
        raise NasError(f"{path}: predictor was trained on space '{enc.space}' with other decisions than "
                       f"space '{space.name}'; fit a new one")
    params = _as_list(doc["params"])
    q = meta.get("quantiles")
    return Predictor(enc, cfg, params, meta["mean"], meta["std"], meta.get("n_train", 0),
                     meta.get("final_loss", float("nan")), quantiles=None if q is None else tuple(q))


def _as_list(tree: Any) -> Any:
    """msgpack_restore gives lists back as {'0': ..., '1': ...}: rebuild the list of layers."""
    if isinstance(tree, Mapping) and tree and all(k.isdigit() for k in tree):
        return [_as_list(tree[str(i)]) for i in range(len(tree))]
    if isinstance(tree, Mapping):
        return {k: _as_list(v) for k, v in tree.items()}
    return tree
