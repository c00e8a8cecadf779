"""The supernet's computation for one candidate: masked conv + BatchNorm per op, one `lax.switch`
per slot over its branches (only the taken branch runs under `jit`), and the BatchNorm moments
each op saw (for re-estimating statistics per candidate).

Inside a branch a second `lax.switch` picks the candidate's own depthwise kernel (the k x k window
of the largest kernel, sliced, not masked) and, for an expanding mb op, the expanded width it is
computed at (the largest for its expansion; masks zero the rest), so a candidate with a 3x3 kernel
and expansion 3 does not pay for a 7x7 kernel at expansion 6. Every variant is in the one program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from search_spaces.errors import SpaceError
from search_spaces.model import ACT_FNS, BN_EPS
from search_spaces.ops import KERNELS, batch_norm_train
from search_spaces.space import SearchSpace
from search_spaces.supernet.candidates import Candidate
from search_spaces.supernet.structure import Layout, Slot, kernel_window, layout


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


def _window(p: dict, size: int, kernel: int, stride: int) -> dict | None:
    """ConvBN variables `p` with the depthwise kernel cut to the k x k window a SAME k x k convolution
    uses at input size `size` (what the candidate's kernel mask keeps); None where there is none."""
    big = p["kernel"].shape[0]
    try:
        o = kernel_window(size, kernel, big, stride)
    except SpaceError:  # no candidate can take this kernel here (`candidate` refuses it)
        return None
    return {**p, "kernel": p["kernel"][o:o + kernel, o:o + kernel]}


def _channels(p: dict, n: int, axis: int) -> dict:
    """ConvBN or Dense variables `p` with the kernel's `axis` (and, for the output axis, BatchNorm's
    vectors, the statistics and a bias) cut to the first `n` channels."""
    k = p["kernel"]
    out = {**p, "kernel": lax.slice_in_dim(k, 0, n, axis=axis)}
    if axis == k.ndim - 1:
        for name in ("bn", "stats"):
            if name in p:
                out[name] = {a: b[:n] for a, b in p[name].items()}
        if "bias" in p:
            out["bias"] = p["bias"][:n]
    return out


def _dw_variants(p: dict, x: jnp.ndarray, stride: int, train: bool, mask: jnp.ndarray, act: str,
                 kernels: tuple[int, ...], which: jnp.ndarray, kmask: jnp.ndarray) -> tuple[jnp.ndarray, dict]:
    """The depthwise ConvBN at the candidate's own kernel (`which` indexes `kernels`): one branch each
    (the largest kernel under `kmask` where a window cannot be cut)."""
    size = x.shape[1]

    def at(k):
        pk = _window(p, size, k, stride)
        if pk is None:
            return lambda x: _conv_bn(p, x, "dwconv", stride, train, mask, act, kmask)
        return lambda x: _conv_bn(pk, x, "dwconv", stride, train, mask, act)

    fns = [at(k) for k in kernels]
    return fns[0](x) if len(fns) == 1 else lax.switch(which, fns, x)


def _pad_moments(m: dict, n: int) -> dict:
    return {k: _fit(a, n) for k, a in m.items()}


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
            y, m1 = _dw_variants(p["dw"], x, sl.stride, train, in_mask, act, sl.ds_kernels, c["ds_kv"], c["ds_k"])
            y, m2 = _conv_bn(p["pw"], y, "pwconv", 1, train, out_mask, act)
            return y, with_moments({("ds", "dw"): m1, ("ds", "pw"): m2})
        return run

    def mb_at(act: str, expand: bool, width: int):
        """The mb op computed at `width` expanded channels (static), padded back to the slot's largest."""
        def run(x):
            p = v["mb"]
            ups = {}
            if expand:
                exp = c["exp"][:width]
                y, m = _conv_bn(_channels(p["expand"], width, 3), x, "pwconv", 1, train, exp, act)
                ups[("mb", "expand")] = _pad_moments(m, sl.expanded)
            else:
                exp = _fit(in_mask, width)
                y = _fit(x, width)
            y, m = _dw_variants(_channels(p["dw"], width, 3), y, sl.stride, train, exp, act, sl.mb_kernels,
                                c["mb_kv"], c["mb_k"])
            ups[("mb", "dw")] = _pad_moments(m, sl.expanded)
            if sl.se:
                se = p["se"]
                s = jnp.mean(y, axis=(1, 2))
                s = jax.nn.relu(s @ se["reduce"]["kernel"][:width] + se["reduce"]["bias"]) * c["se"]
                red = _channels(se["expand"], width, 1)
                gate = ACT_FNS["hsigmoid" if act == "hswish" else "sigmoid"](s @ red["kernel"] + red["bias"])
                y = y * (c["se_on"] * gate + (1.0 - c["se_on"]))[:, None, None, :]
            y, ups[("mb", "project")] = _conv_bn(_channels(p["project"], width, 2), y, "pwconv", 1, train, out_mask)
            if sl.stride == 1:
                y = y + c["residual"] * _fit(x, sl.cout)
            return y, with_moments(ups)
        return run

    def mb(act, expand: bool):
        if not expand or len(sl.mb_widths) < 2:
            return mb_at(act, expand, sl.mb_widths[-1] if expand and sl.mb_widths else sl.expanded)
        fns = [mb_at(act, True, w) for w in sl.mb_widths]
        return lambda x: lax.switch(c["mb_wv"], fns, x)

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
    return classify(v, feats), feats, _moment_tree(lay, mom)


def classify(v: dict, feats: jnp.ndarray) -> jnp.ndarray:
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
