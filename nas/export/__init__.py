"""Export winners as self-contained, verified deployment folders, and load them back (`nas.load`).

One folder per exported model (`OUT/NN-KEY/`):
| file | what |
|---|---|
| architecture.json | space, key, the resolved network, input shape/layout and normalisation |
| cost.json | analytic params, MACs, weight bytes, per layer; predicted latency per hardware profile |
| metrics.json | accuracies (before/after distillation, per format), every check's result, sizes, latencies |
| flax/variables.msgpack (+ manifest.json) | trained params and BatchNorm statistics (Flax msgpack) |
| model.onnx | jax2onnx export of the reference implementation, dynamic batch dimension 'B' |
| model.stablehlo | `jax.export` serialization, symbolic batch, lowered for cpu, cuda and tpu |
| model.int8.onnx | ONNX Runtime static quantization (QDQ, per-channel int8 weights), with --int8 |
| README.md | the model card |

Every format is checked as it is written, through the very loader that `load(folder, format)`
uses: its logits on the whole test split must match JAX's within `tolerance` (max abs) with the
same test accuracy; the int8 model must lose at most `int8_max_drop` test accuracy against fp32.
A format that fails is not left in the folder, the folder is renamed `NN-KEY.failed`, the
failure is recorded in metrics.json and README.md, and `export_run` raises once all are done.

Modules: `stage` (export_run), `formats` (writers), `checks` (verification, latency), `loading`
(load, LoadedModel), `card` (README.md).
"""

from nas.export.loading import LoadedModel, load
from nas.export.stage import export_run

__all__ = ["LoadedModel", "export_run", "load"]
