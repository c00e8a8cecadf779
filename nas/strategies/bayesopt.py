"""Bayesian optimisation with a categorical Gaussian process (the project's default strategy).

Model: a GP over option-index vectors with an ARD "Hamming" kernel
``k(x, x') = s2 * exp(-sum_d w_d [x_d != x'_d])`` (an RBF on one-hot encodings, one relevance
weight per decision; an inactive layer is its own category), a constant mean and a learned
noise level. Scores are standardised, or with ``transform='copula'`` mapped through their ranks
to normal quantiles, which keeps a few very bad architectures from flattening the model where
the good ones are. Hyper-parameters maximise the marginal likelihood (L-BFGS-B, warm-started,
weak log-normal priors), refitted every step early on and every ~n/20 observations later.

Search: after ``n_init`` space-filling random candidates (each the farthest, in Hamming
distance, from those seen, of a few random draws), each suggestion maximises the upper
confidence bound ``mu + beta * sd`` (or, with ``acquisition='ei'``, expected improvement over
the best feasible score) among all unseen candidates when the space has at
most ``exhaustive`` architectures; otherwise among ``candidates`` random draws plus every
single-decision neighbour and random two-decision neighbours of the ``top`` best observed
architectures. Candidates are checked against the feasibility predicate in order of
acquisition, so infeasible architectures are never proposed. Pending trials (suggested, not
yet observed) enter the model with their predicted mean ("kriging believer"), which shrinks
the uncertainty around them so parallel suggestions spread out.
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping

import numpy as np
from scipy.linalg import cho_factor, cho_solve, solve_triangular
from scipy.optimize import minimize
from scipy.special import ndtr, ndtri

from nas.strategies.base import STRATEGIES, BaseStrategy, choice_option, float_option, int_option
from search_spaces.space import ALPHABET, INACTIVE

_LOG_BOUNDS_W = (np.log(1e-3), np.log(20.0))
_LOG_BOUNDS_S2 = (np.log(0.05), np.log(20.0))
_LOG_BOUNDS_NOISE = (np.log(1e-6), np.log(1.0))
_PRIOR_SD = 2.0  # weak log-normal priors on all hyper-parameters


# Kept over Optuna's GPSampler: NAS-Bench-Macro, 20 seeds, median queries to the best network 37.5 (20/20 seeds)
# vs 78 (16/20) without constraint, 26 vs 44 (and 0 vs 21.5 infeasible queries) under FLOPs <= 45.5M; to within
# 0.1 point 24 vs 22.5 and 15 vs 29 (benchmarks/search_macro.py --algorithms default,optuna-gp).
@STRATEGIES.register("bayesopt")
class GPBayesOpt(BaseStrategy):
    """GP + UCB over categorical decisions (see the module docstring).

    Options: ``n_init`` (10), ``acquisition`` ('ucb' | 'ei'), ``beta`` (2.0, UCB), ``xi`` (0.0, EI),
    ``transform`` ('copula' | 'standard'), ``exhaustive`` (50000: score every key of smaller
    spaces), ``candidates`` (2000 random draws otherwise), ``top`` (10 neighbourhoods),
    ``init_pool`` (20 draws per space-filling initial point).
    """

    name = "bayesopt"
    OPTIONS = {
        "n_init": int_option(10, low=1),
        "acquisition": choice_option("ucb", ("ucb", "ei")),
        "xi": float_option(0.0, 0.0, 10.0),
        "beta": float_option(2.0, 0.0, 100.0),
        "transform": choice_option("copula", ("copula", "standard")),
        "exhaustive": int_option(50_000, low=0),
        "candidates": int_option(2000, low=1),
        "top": int_option(10, low=1),
        "init_pool": int_option(20, low=1),
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        sizes = self.n_options + 1  # one extra category: inactive
        self._offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self._n_feat = int(sizes.sum())
        self._all_keys: list[str] | None = None
        self._all_onehot: np.ndarray | None = None
        self._reset()

    def _check_budget(self) -> None:
        self._budget_at_least("n_init")

    def _reset(self) -> None:
        d = len(self.decisions)
        self.theta = np.concatenate([np.full(d, np.log(1.0 / max(d, 1))), [0.0, np.log(1e-2)]])
        self._fit_n = 0

    # ------------------------------------------------------------------ persistence extras
    def _extra_state(self) -> dict[str, Any]:
        return {"theta": [float(t) for t in self.theta], "fit_n": self._fit_n}

    def _restore_extra(self, extra: Mapping[str, Any]) -> None:
        if "theta" in extra:
            self.theta = np.array(extra["theta"], dtype=float)
            self._fit_n = int(extra["fit_n"])

    # ------------------------------------------------------------------ encodings
    def _codes(self, key: str) -> np.ndarray:
        return np.array([self.n_options[i] if c == INACTIVE else ALPHABET.index(c) for i, c in enumerate(key)])

    def _onehot(self, keys: list[str]) -> np.ndarray:
        out = np.zeros((len(keys), self._n_feat))
        if keys:
            codes = np.stack([self._codes(k) for k in keys])
            rows = np.repeat(np.arange(len(keys)), codes.shape[1])
            out[rows, (codes + self._offsets).ravel()] = 1.0
        return out

    def _wexp(self, w: np.ndarray) -> np.ndarray:
        return np.repeat(w, self.n_options + 1)

    # ------------------------------------------------------------------ proposal
    def _propose(self) -> str | None:
        # small dense linear algebra: BLAS threads only add contention (a 300x300 Cholesky
        # measured 1.7 ms single-threaded vs 40 ms multi-threaded on a loaded 2-core machine)
        with _single_thread():
            return self._propose_gp()

    def _propose_gp(self) -> str | None:
        obs = [(k, s, f) for k, s, f in self.history if s is not None]
        if len(obs) + len(self.pending) < self.opts["n_init"] or len(obs) < 2:
            return self._space_filling()
        keys = [k for k, _, _ in obs]
        y = self._transform(np.array([s for _, s, _ in obs]))
        ok = np.array([f for _, _, f in obs])
        X = self._onehot(keys)
        n = len(keys)
        if self._fit_n == 0 or n - self._fit_n >= max(1, n // 20):
            self.theta = self._fit(X, y, self.theta)
            self._fit_n = n
        model = _GP(X, y, self.theta, self._wexp)
        if self.pending:  # kriging believer: pending points with their predicted means
            Xp = self._onehot(list(self.pending))
            mu_p, _ = model.predict(Xp)
            model = _GP(np.vstack([X, Xp]), np.concatenate([y, mu_p]), self.theta, self._wexp, center=model.mean)
        cand = self._candidates(keys)
        if not cand:
            return self.random_key()
        mu, sd = model.predict(self._onehot_cached(cand))
        best = float(np.max(y[ok])) if ok.any() else float(np.max(y))
        acq = self._acquisition(mu, sd, best)
        for i in np.argsort(-acq, kind="stable"):
            if self.is_feasible(cand[i]):
                return cand[i]
        return self.random_key()

    def _acquisition(self, mu: np.ndarray, sd: np.ndarray, best: float) -> np.ndarray:
        if self.opts["acquisition"] == "ucb":
            return mu + self.opts["beta"] * sd
        z = (mu - best - self.opts["xi"]) / sd
        return sd * (z * ndtr(z) + np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi))

    def _space_filling(self) -> str | None:
        """The candidate farthest (min Hamming distance) from all seen keys, of `init_pool` draws."""
        draws = []
        for _ in range(self.opts["init_pool"]):
            key = self.random_key()
            if key is None:
                break
            if key not in draws:
                draws.append(key)
        if not draws or not self.seen:
            return draws[0] if draws else None
        seen = np.stack([self._codes(k) for k, _, _ in self.history] + [self._codes(k) for k in self.pending])
        dist = [int((seen != self._codes(k)).sum(axis=1).min()) for k in draws]
        return draws[int(np.argmax(dist))]

    def _candidates(self, keys: list[str]) -> list[str]:
        if self.space.size() <= self.opts["exhaustive"]:
            if self._all_keys is None:
                self._all_keys = list(self.space.keys())
            return [k for k in self._all_keys if k not in self.seen]
        scored = sorted(((s, i) for i, (k, s, f) in enumerate(self.history) if s is not None and f), reverse=True)
        out: dict[str, None] = {}
        for _, i in scored[: self.opts["top"]]:
            key = self.history[i][0]
            vec = self.vec_of(key)
            for d, c in enumerate(key):
                if c == INACTIVE:
                    continue
                for o in range(self.n_options[d]):
                    if o != vec[d]:
                        v = vec.copy()
                        v[d] = o
                        out[self.key_of(v)] = None
            for _ in range(50):
                out[self.mutate(key, 2)] = None
        for _ in range(self.opts["candidates"]):
            out[self.key_of(self.random_vec())] = None
        return [k for k in out if k not in self.seen]

    def _onehot_cached(self, cand: list[str]) -> np.ndarray:
        if self._all_keys is not None and len(cand) > 0 and self.space.size() <= self.opts["exhaustive"]:
            if self._all_onehot is None:
                self._all_onehot = self._onehot(self._all_keys)
                self._row = {k: i for i, k in enumerate(self._all_keys)}
            return self._all_onehot[[self._row[k] for k in cand]]
        return self._onehot(cand)

    # ------------------------------------------------------------------ model
    def _transform(self, s: np.ndarray) -> np.ndarray:
        if self.opts["transform"] == "copula":
            ranks = (np.argsort(np.argsort(s, kind="stable"), kind="stable") + 0.5) / len(s)
            # ties share the mean rank so equal scores get equal targets
            for v in np.unique(s):
                m = s == v
                ranks[m] = ranks[m].mean()
            return ndtri(ranks)
        sd = s.std()
        return (s - s.mean()) / (sd if sd > 0 else 1.0)

    def _fit(self, X: np.ndarray, y: np.ndarray, theta0: np.ndarray) -> np.ndarray:
        d = len(self.decisions)
        # per-decision mismatch matrices
        blocks = [X[:, o: o + int(k) + 1] for o, k in zip(self._offsets, self.n_options)]
        M = np.stack([1.0 - b @ b.T for b in blocks])
        prior_mu = np.concatenate([np.full(d, np.log(1.0 / max(d, 1))), [0.0, np.log(1e-2)]])
        n = len(y)

        def nll(theta: np.ndarray) -> tuple[float, np.ndarray]:
            w, s2, noise = np.exp(theta[:d]), np.exp(theta[d]), np.exp(theta[d + 1])
            Kf = s2 * np.exp(-np.tensordot(w, M, axes=1))
            K = Kf + (noise + 1e-8) * np.eye(n)
            try:
                c = cho_factor(K, lower=True)
            except np.linalg.LinAlgError:
                return 1e10, np.zeros_like(theta)
            yc = y - y.mean()
            alpha = cho_solve(c, yc)
            val = 0.5 * yc @ alpha + np.log(np.diag(c[0])).sum()
            A = np.outer(alpha, alpha) - cho_solve(c, np.eye(n))
            AK = A * Kf
            g = np.empty_like(theta)
            g[:d] = 0.5 * w * np.tensordot(M, AK, axes=([1, 2], [0, 1]))
            g[d] = -0.5 * AK.sum()
            g[d + 1] = -0.5 * noise * np.trace(A)
            r = theta - prior_mu
            return val + 0.5 * (r @ r) / _PRIOR_SD**2, g + r / _PRIOR_SD**2

        bounds = [_LOG_BOUNDS_W] * d + [_LOG_BOUNDS_S2, _LOG_BOUNDS_NOISE]
        best = None
        starts = [np.clip(theta0, *np.array(bounds).T)] + ([prior_mu] if n <= 40 else [])
        for start in starts:
            res = minimize(nll, start, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": 100})
            if best is None or res.fun < best.fun:
                best = res
        return np.asarray(best.x, dtype=float)


def _single_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


class _GP:
    """Exact GP posterior for fixed hyper-parameters over one-hot inputs."""

    def __init__(self, X: np.ndarray, y: np.ndarray, theta: np.ndarray, wexp, center: float | None = None):
        d = len(theta) - 2
        self.w, self.s2, self.noise = np.exp(theta[:d]), float(np.exp(theta[d])), float(np.exp(theta[d + 1]))
        self.we = wexp(self.w)
        self.X = X
        self.mean = float(y.mean()) if center is None else center
        K = self._k(X, X) + (self.noise + 1e-8) * np.eye(len(y))
        self.L = np.linalg.cholesky(K)
        self.alpha = cho_solve((self.L, True), y - self.mean)

    def _k(self, A: np.ndarray, B: np.ndarray) -> np.ndarray:
        return self.s2 * np.exp(-(self.w.sum() - (A * self.we) @ B.T))

    def predict(self, Xc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        Kc = self._k(Xc, self.X)
        mu = self.mean + Kc @ self.alpha
        v = solve_triangular(self.L, Kc.T, lower=True)
        var = np.maximum(self.s2 - (v * v).sum(axis=0), 1e-12)
        return mu, np.sqrt(var)


STRATEGIES.register("default", GPBayesOpt)
