"""Architecture (or one layer) -> ONNX, and ONNX Runtime sessions to run it.

The export goes through `jax2onnx` on the *reference* implementation (plain `lax.conv`
everywhere, `build_model(arch, 'reference')`): the shifted-multiply-add depthwise variant
used for training exports too, but ONNX Runtime ran that
export of a 6-block MobileNetV2-style net ~18x slower than a plain-convolution export (batch 1).

jax2onnx 0.17 workaround: its layout pass pushes the NHWC<->NCHW transposes it puts around
every convolution through BatchNorm and the elementwise activations after it, but leaves the
old NHWC shapes in `graph.value_info` (and in `graph.output` when `outputs_as_nchw` lets it
drop the final transpose). ONNX Runtime trusts those declarations and refuses to
load the model ("[ShapeInferenceError] Incompatible dimensions" at a Mul of hard-swish or at a
residual Add). The graph itself is right, so `_fix_shapes` drops the stale intermediate
declarations and re-runs strict ONNX shape inference.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnx.numpy_helper

from search_spaces.architecture import Architecture
from search_spaces.errors import NasError
from search_spaces.model import build_model, input_shape

OPSET = 23
INPUT_NAME = "input"
OUTPUT_NAME = "logits"

Variables = Any


def _const_value(graph: onnx.GraphProto, name: str, consts: dict[str, np.ndarray]) -> float | None:
    """The value of a scalar constant input (initializer or Constant node), else None."""
    v = consts.get(name)
    if v is None or v.size != 1:
        return None
    return float(v.reshape(-1)[0])


def fuse_activations(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite jax2onnx's elementwise activation patterns as the native ONNX operators.

    jax2onnx writes relu as Max(x, 0), relu6 as Min(Max(x, 0), 6) and hard-swish as
    x * Min(Max(x + 3, 0), 6) / 6. ONNX Runtime fuses none of these into the preceding Conv and
    its NCHWc layout pass then reorders the tensor out of and back into blocked layout around
    every one of them. As Relu / Clip / HardSigmoid / HardSwish they fuse or stay blocked.
    Same results (exact for relu/relu6, float rounding for the hard functions).
    """
    g = model.graph
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = onnx.numpy_helper.to_array(n.attribute[0].t)

    def scalar_other(node, value):
        """The non-constant input of a binary node whose other input is the scalar `value`."""
        a, b = node.input
        if _const_value(g, b, consts) == value:
            return a
        if _const_value(g, a, consts) == value:
            return b
        return None

    def rebuild(nodes):
        del g.node[:]
        g.node.extend(nodes)

    # 1. Max(x, 0) -> Relu(x)
    nodes = []
    for n in g.node:
        x = scalar_other(n, 0.0) if n.op_type == "Max" and len(n.input) == 2 else None
        nodes.append(onnx.helper.make_node("Relu", [x], list(n.output), name=n.name) if x else n)
    rebuild(nodes)
    for _ in range(3):  # 2. Min(Relu(x), 6) -> Clip(x, 0, 6); 3. Clip(x+3)/6 -> HardSigmoid; 4. x*HS(x) -> HardSwish
        producer = {o: n for n in g.node for o in n.output}
        uses: dict[str, int] = {}
        for n in g.node:
            for i in n.input:
                uses[i] = uses.get(i, 0) + 1
        outputs = {o.name for o in g.output}
        dead: set[int] = set()
        new: dict[int, onnx.NodeProto] = {}

        def single(name):
            p = producer.get(name)
            return p if p is not None and uses.get(name) == 1 and name not in outputs and id(p) not in dead else None

        for n in g.node:
            if n.op_type == "Min" and len(n.input) == 2:
                r = scalar_other(n, 6.0)
                p = single(r) if r else None
                if p is not None and p.op_type == "Relu":
                    zero, six = n.name + "_zero", n.name + "_six"
                    g.initializer.extend([onnx.numpy_helper.from_array(np.array(0.0, np.float32), zero),
                                          onnx.numpy_helper.from_array(np.array(6.0, np.float32), six)])
                    consts[zero], consts[six] = np.array(0.0), np.array(6.0)
                    new[id(n)] = onnx.helper.make_node("Clip", [p.input[0], zero, six], list(n.output), name=n.name)
                    dead.add(id(p))
            elif n.op_type == "Div" and len(n.input) == 2 and _const_value(g, n.input[1], consts) == 6.0:
                c = single(n.input[0])
                if c is not None and c.op_type == "Clip" and [_const_value(g, i, consts) for i in c.input[1:]] == [0.0, 6.0]:
                    a = single(c.input[0])
                    x = scalar_other(a, 3.0) if a is not None and a.op_type == "Add" else None
                    if x:
                        new[id(n)] = onnx.helper.make_node("HardSigmoid", [x], list(n.output), name=n.name,
                                                           alpha=1.0 / 6.0, beta=0.5)
                        dead.update({id(c), id(a)})
            elif n.op_type == "Mul" and len(n.input) == 2:
                for x, h in (n.input, n.input[::-1]):
                    p = single(h)
                    if p is not None and p.op_type == "HardSigmoid" and p.input[0] == x:
                        new[id(n)] = onnx.helper.make_node("HardSwish", [x], list(n.output), name=n.name)
                        dead.add(id(p))
                        break
        if not new:
            break
        rebuild([new.get(id(n), n) for n in g.node if id(n) not in dead])
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return model


def drop_zero_gemm_bias(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove the optional C input of a Gemm when it is a zero scalar constant.

    jax2onnx writes every matrix product as Gemm(A, B, C) with C a shared 0-d zero (a Dense bias
    follows as an Add). ONNX Runtime's static quantizer indexes C per output channel and failed
    ("array is 0-dimensional") on a low-rank factorized classifier, whose two Gemms share that C.
    Without the input the Gemm computes the same."""
    g = model.graph
    zero = {i.name for i in g.initializer
            if not i.dims and not np.any(onnx.numpy_helper.to_array(i))}
    for n in g.node:
        if n.op_type == "Gemm" and len(n.input) == 3 and n.input[2] in zero:
            del n.input[2]
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used or i.name not in zero]
    del g.initializer[:]
    g.initializer.extend(keep)
    return model


def _fix_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop jax2onnx's stale intermediate and output shapes and infer them again (strict)."""
    del model.graph.value_info[:]
    for out in model.graph.output:  # stale too when the final transpose was removed
        out.type.tensor_type.ClearField("shape")
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as e:  # onnx raises InferenceError / ValidationError
        raise NasError(f"ONNX export: shape inference failed on the exported graph: {e}".splitlines()[0]) from None


def function_to_onnx(fn: Callable[[jnp.ndarray], jnp.ndarray], in_shape: Sequence[int], *,
                     batch: int | None = None, nchw_in: bool = False, nchw_out: bool = False,
                     name: str = "model", input_name: str = INPUT_NAME,
                     output_name: str = "output") -> onnx.ModelProto:
    """Export a one-input, one-output JAX function of an NHWC image (without batch dim).

    `batch=None` gives a dynamic batch dimension named 'B'. `nchw_in`/`nchw_out` make the
    ONNX input/output NCHW (used for single-layer latency models, so the layout transposes
    cancel inside the graph as they do between layers of a whole network).
    """
    from jax2onnx import to_onnx as j2o  # heavy import (plugins): only when exporting

    spec = ("B" if batch is None else int(batch),) + tuple(int(s) for s in in_shape)
    logging.getLogger("jax2onnx").setLevel(logging.ERROR)
    model = j2o(fn, [spec], model_name=name, opset=OPSET,
                inputs_as_nchw=[0] if nchw_in else None, outputs_as_nchw=[0] if nchw_out else None,
                input_names=[input_name], output_names=[output_name])
    return _fix_shapes(drop_zero_gemm_bias(fuse_activations(model)))


def to_onnx(arch: Architecture, variables: Variables, *, batch: int | None = None) -> onnx.ModelProto:
    """The whole network in inference mode as an ONNX model: NHWC float32 input -> logits.

    Args:
      arch: the architecture.
      variables: its Flax variables (`params` and `batch_stats`), e.g. from training or
        `random_variables(arch)`.
      batch: a fixed batch size, or None (default) for a dynamic batch dimension 'B'.

    Returns:
      An `onnx.ModelProto` (opset 23) with input 'input' and output 'logits'.

    Example:
      >>> model = to_onnx(arch, variables)
      >>> sess = ort_session(model)
      >>> logits = run(sess, np.zeros((4, 28, 28, 1), np.float32))
    """
    net = build_model(arch, "reference")

    def forward(x):
        return net.apply(variables, x, train=False)

    return function_to_onnx(forward, input_shape(arch)[1:], batch=batch, name=f"{arch.space}_{arch.key}",
                            output_name=OUTPUT_NAME)


def random_variables(module: Any, in_shape: Sequence[int], seed: int = 0) -> Variables:
    """Random variables for a linen module without compiling its init: He-normal kernels and
    non-trivial BatchNorm statistics and affine terms (fresh BatchNorm - mean 0, var 1, scale 1,
    bias 0 - would hide export bugs in its lowering; these make outputs O(1))."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, *in_shape), jnp.float32)))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if name.endswith("['kernel']"):
            fan_in = max(1, math.prod(s.shape[:-1]))
            return rng.normal(0, math.sqrt(2.0 / fan_in), s.shape).astype(np.float32)
        if name.endswith("['var']") or name.endswith("['scale']"):
            return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
        return rng.normal(0, 0.2, s.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def arch_variables(arch: Architecture, seed: int = 0) -> Variables:
    """`random_variables` for a whole network."""
    return random_variables(build_model(arch, "reference"), input_shape(arch)[1:], seed)


def ort_session(model: onnx.ModelProto | bytes | str | os.PathLike, *, threads: int = 1) -> Any:
    """An ONNX Runtime CPU session, single-threaded by default.

    One intra-op thread: deployment targets run one stream per core, and on a shared
    machine extra threads make timings depend on other processes' load.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    if isinstance(data, os.PathLike):
        data = os.fspath(data)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def run(session: Any, x: np.ndarray, batch: int | None = None) -> np.ndarray:
    """Run a one-input, one-output session; with `batch`, over `x` in slices of at most `batch` rows,
    outputs concatenated (e.g. a whole test split without one huge input)."""
    if batch is not None:
        return np.concatenate([run(session, x[i:i + batch]) for i in range(0, len(x), batch)])
    return session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(x, np.float32)})[0]
