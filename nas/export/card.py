"""The model card (README.md) of an export folder, written from its metrics.json and cost.json."""

from __future__ import annotations

from typing import Any, Mapping

from nas.compress_report import CompressionReport
from nas.export.loading import FILES
from search_spaces.architecture import Architecture


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * float(v):.2f}%"


def _ms(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.3f} ms"


# Markdown tables as f-strings: pandas.DataFrame.to_markdown needs tabulate, not a dependency, for a few rows.
def model_card(arch: Architecture, m: Mapping[str, Any], cost: Mapping[str, Any], name: str) -> str:
    """README.md of an export folder: what the model is, accuracy, size, latency, checks, how to run it."""
    fmt, lat = m["formats"], m.get("latency_ms", {})
    L: list[str] = [f"# {arch.space} `{arch.key}`", ""]
    if m["failures"]:
        L += ["**EXPORT FAILED ITS CHECKS** — do not deploy the failed formats (their files were not kept):", ""]
        L += [f"- {f}" for f in m["failures"]] + [""]
    L += ["## What it is", "",
          f"An image classifier found by neural architecture search in the `{arch.space}` space "
          f"(winner {m['rank']} of run `{m['run']}`, search score {_fmt(m.get('score'))}, "
          f"validation accuracy {_pct(m.get('val_accuracy'))}), trained on `{m['dataset']}`"
          + (", then knowledge-distilled" + _teacher(m) if m.get("distilled") else "") + ".", "",
          f"- input: `input`, float32 NHWC `(N, {arch.resolution}, {arch.resolution}, {arch.in_channels})`, "
          "any batch size N, normalised per channel: `x = (image - mean) / std` with the training split's "
          "statistics (in architecture.json, `input.normalization`)",
          f"- output: `logits`, float32 `(N, {arch.num_classes})`; the class is `argmax`",
          "- layers: " + ", ".join(f"`{t}`" for t in arch.describe()), ""]
    L += ["## Accuracy", "", f"Test split of `{m['dataset']}`, {m['test_images']} images.", "",
          "| what | test accuracy |", "|---|---|"]
    if "test_accuracy_before_distill" in m:
        L.append(f"| before distillation | {_pct(m.get('test_accuracy_before_distill'))} |")
        d = m.get("distillation", {})
        after = _pct(m.get("test_accuracy_after_distill"))
        if d.get("kd_std") is not None:
            after += f" ± {100 * d['kd_std']:.2f} (mean ± std over {m['distillation'].get('seeds') or '?'} seeds)"
        L.append(f"| after distillation (distillation report) | {after} |")
        if d.get("baseline_acc") is not None:
            L.append(f"| fine-tuned without a teacher (baseline) | {_pct(d['baseline_acc'])}"
                     + (f" ± {100 * d['baseline_std']:.2f}" if d.get("baseline_std") is not None else "") + " |")
    L.append(f"| this model, JAX (flax weights) | {_pct(m['test_accuracy'])} |")
    for f, label in (("onnx", "ONNX Runtime fp32"), ("stablehlo", "StableHLO (jax.export)"),
                     ("int8", "ONNX Runtime int8")):
        c = fmt.get(f, {}).get("check", {})
        if c.get("passed"):
            L.append(f"| this model, {label} | {_pct(c.get('accuracy'))} |")
    L += ["", "## Size", "", "| what | value |", "|---|---|",
          f"| parameters | {cost['params']:,} |", f"| multiply-accumulates per image | {cost['macs']:,} |",
          f"| weight bytes, fp32 (analytic) | {cost['weight_bytes'].get('fp32', 0):,} |",
          f"| weight bytes, int8 (analytic) | {cost['weight_bytes'].get('int8', 0):,} |"]
    for f in ("flax", "onnx", "stablehlo", "int8"):
        if fmt.get(f, {}).get("file"):
            L.append(f"| file `{fmt[f]['file']}` | {fmt[f]['bytes']:,} bytes |")
    if fmt.get("int8", {}).get("size_ratio_fp32_over_int8"):
        L.append(f"| model.onnx / model.int8.onnx | {fmt['int8']['size_ratio_fp32_over_int8']:.2f}x |")
    L += ["", "## Latency", "", "Predicted (cost model, batch 1):", "",
          "| profile | fp32 | int8 | method |", "|---|---|---|---|"]
    for p, row in cost.get("predicted_latency_ms", {}).items():
        L.append(f"| {p} | {_ms(row.get('fp32_ms'))} | {_ms(row.get('int8_ms'))} | {row.get('method', '')} |")
    if lat:
        mach = m.get("machine", {})
        L += ["", f"Measured on the export machine ({mach.get('cpu', '?')}, {mach.get('cores', '?')} cores, "
              f"load average {mach.get('load_average')} at export; ONNX Runtime {mach.get('onnxruntime')} with one "
              f"thread, JAX {mach.get('jax')} jitted), minimum of ten short medians spread over the measurement:", "",
              "| runtime | batch 1 | batch 32 |", "|---|---|---|"]
        for k, label in (("jax", "JAX jit (flax weights)"), ("onnx", "ONNX Runtime fp32"),
                         ("int8", "ONNX Runtime int8")):
            if k in lat:
                L.append(f"| {label} | {_ms(lat[k].get('batch1'))} | {_ms(lat[k].get('batch32'))} |")
    L += ["", "## Numerical checks (at export)", "",
          "Every format was reloaded through `nas.load(folder, format=...)` and run on the whole test split.", "",
          "| format | result | max abs logit diff vs JAX | accuracy | detail |", "|---|---|---|---|---|"]
    for f, info in fmt.items():
        c = info["check"]
        diff = c.get("max_abs_diff")
        detail = c.get("reason", "")
        if f == "int8" and "accuracy_drop" in c:
            detail = (f"drop {100 * c['accuracy_drop']:.2f} points vs fp32 (allowed {100 * c['max_drop']:.2f}), "
                      f"{100 * c['agreement_with_fp32']:.1f}% same predictions" + (f"; {detail}" if detail else ""))
        elif diff is not None:
            sizes = f", batch sizes {c['batch_sizes']}" if c.get("batch_sizes") else ""
            detail = f"tolerance {c['tolerance']:g}{sizes}" + (f"; {detail}" if detail else "")
        L.append(f"| {f} | {'passed' if c['passed'] else 'FAILED'} | {'' if diff is None else f'{diff:.2g}'} "
                 f"| {_pct(c.get('accuracy')) if 'accuracy' in c else ''} | {detail} |")
    files = {f: fmt[f]["file"] for f in fmt if fmt[f].get("file")}
    L += ["", *how_to_load(arch, name, files, fmt.get("stablehlo", {}).get("platforms", []))]
    return "\n".join(L)


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.4f}"


def _teacher(m: Mapping[str, Any]) -> str:
    t = (m.get("distillation") or {}).get("teacher") or {}
    if not t:
        return ""
    acc = t.get("test_accuracy")
    return f" from teacher `{t.get('key', '?')}`" + (f" (test accuracy {_pct(acc)})" if acc is not None else "")


def how_to_load(arch: Architecture, name: str, files: Mapping[str, str], platforms: list[str] = ()) -> list[str]:
    """The card's 'How to load and run' section for a folder holding `files` (format -> file name)."""
    L = ["## How to load and run", "", "```python",
         "import numpy as np",
         f"FOLDER = \"path/to/{name}\"   # this folder",
         f"x = np.zeros((4, {arch.resolution}, {arch.resolution}, {arch.in_channels}), np.float32)  "
         "# normalised images: (image - mean) / std", "```", ""]
    L += ["With this project installed (`pip install -e .` in compact-nas), any format:", "", "```python", "import nas",
          "model = nas.load(FOLDER)                      # flax" + (
              "; or format=" + " | ".join(f'"{f}"' for f in others) if (others := [f for f in files if f != "flax"])
              else ""),
          "logits = model(x)                             # (N, classes) numpy", "```", ""]
    if "onnx" in files or "int8" in files:
        f = FILES["onnx"] if "onnx" in files else FILES["int8"]
        L += ["ONNX Runtime only (`pip install onnxruntime numpy`)"
              + ("; `model.int8.onnx` runs the same way:" if "int8" in files else ":"), "",
              "```python", "import onnxruntime as ort",
              f"sess = ort.InferenceSession(f\"{{FOLDER}}/{f}\", providers=[\"CPUExecutionProvider\"])",
              "logits = sess.run(None, {\"input\": x})[0]", "```", ""]
    if "stablehlo" in files:
        L += [f"StableHLO through JAX only (`pip install jax`; lowered for {', '.join(platforms)}):",
              "", "```python", "from jax import export",
              "with open(f\"{FOLDER}/model.stablehlo\", \"rb\") as f:",
              "    exported = export.deserialize(bytearray(f.read()))",
              "logits = exported.call(x)", "```", ""]
    if "flax" in files:
        L += ["Flax weights with this project's model builder:", "", "```python", "import json",
              "from flax.serialization import msgpack_restore",
              "from search_spaces.architecture import Architecture", "from search_spaces.model import build_model",
              "arch = Architecture.from_dict(json.load(open(f\"{FOLDER}/architecture.json\"))[\"architecture\"])",
              "variables = msgpack_restore(open(f\"{FOLDER}/flax/variables.msgpack\", \"rb\").read())",
              "logits = build_model(arch).apply(variables, x, train=False)", "```", ""]
    return L


# ============================================================ compressed model folders
def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _n(v: float | None) -> str:
    return "n/a" if v is None else f"{int(round(v)):,d}"


def _pt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.2f} pt"


LATENCY_ROWS = (("before", "original, fp32"), ("after", "compressed, fp32 (model.onnx)"),
                ("before_int8", "original, int8 (post-training, timing only)"), ("after_int8", "compressed, int8"))


def compression_tables(rep: CompressionReport) -> list[str]:
    """The compression report as Markdown tables: size, accuracy, measured latency, energy."""
    L = ["| what | before | after | before / after |", "|---|---:|---:|---:|",
         f"| parameters | {_n(rep.params.before)} | {_n(rep.params.after)} | {_x(rep.params.ratio)} |",
         f"| multiply-accumulates per image | {_n(rep.macs.before)} | {_n(rep.macs.after)} | {_x(rep.macs.ratio)} |",
         f"| file, fp32 ONNX (bytes) | {_n(rep.onnx_bytes.before)} | {_n(rep.onnx_bytes.after)} "
         f"| {_x(rep.onnx_bytes.ratio)} |"]
    if rep.shipped_bytes is not None:
        L.append(f"| file shipped: fp32 original vs model.int8.onnx (bytes) | {_n(rep.shipped_bytes.before)} "
                 f"| {_n(rep.shipped_bytes.after)} | {_x(rep.shipped_bytes.ratio)} |")
    L += ["", "| test accuracy | value | change |", "|---|---:|---:|",
          f"| original (fp32) | {_pct(rep.accuracy_before)} | |",
          f"| compressed, fp32 | {_pct(rep.accuracy_after)} | {_pt(rep.accuracy_change_pt)} |"]
    if rep.accuracy_int8 is not None:
        L.append(f"| compressed, int8 (model.int8.onnx) | {_pct(rep.accuracy_int8)} | {_pt(rep.int8_change_pt)} |")
    if rep.latency_ms:
        L += ["", "Measured ONNX Runtime latency (one thread, every figure alternated with the others in one "
              "process; speedup = the original fp32's latency / this one's)"
              + (f"; int8 of the compressed network: {rep.latency_int8_source}" if rep.latency_int8_source else "")
              + ":", "",
              "| model | batch 1 | speedup | batch 32 | speedup |", "|---|---:|---:|---:|---:|"]
        for k, label in LATENCY_ROWS:
            if k in rep.latency_ms:
                row = rep.latency_ms[k]
                L.append(f"| {label} | {_ms(row.get('batch1'))} | {_x(rep.speedup(k, 'batch1'))} "
                         f"| {_ms(row.get('batch32'))} | {_x(rep.speedup(k, 'batch32'))} |")
    else:
        L += ["", "Latency: not measured (compress.latency_budget_s = 0)."]
    if rep.energy_mj:
        L += ["", "Energy per inference (batch 1, `evaluators.energy`: arithmetic + weight and activation traffic):", "",
              "| profile:precision | before (mJ) | after (mJ) | before / after |", "|---|---:|---:|---:|"]
        for k, e in rep.energy_mj.items():
            L.append(f"| {k} | {_e(e.before)} | {_e(e.after)} | {_x(e.ratio)} |")
    return L


def _e(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def compressed_card(arch: Architecture, metrics: Mapping[str, Any], name: str) -> str:
    """README.md of a compressed model folder (`nas compress`): what it is, the compression report, how to run it."""
    rep = CompressionReport.from_metrics(metrics, name)
    L = [f"# {arch.space} `{arch.key}` (compressed)", "", "## What it is", "",
         f"Winner {rep.rank if rep.rank is not None else '?'} `{rep.pruned_from}` of its run, compressed: "
         f"{rep.techniques()}; data `{metrics.get('dataset', '?')}`"
         + (f", fine-tuned with distillation from teacher `{metrics['teacher'].get('key', '?')}`"
            if isinstance(metrics.get("teacher"), Mapping) else "") + ".", "",
         f"- input: `input`, float32 NHWC `(N, {arch.resolution}, {arch.resolution}, {arch.in_channels})`, "
         "normalised per channel with the training split's statistics (architecture.json, `input`)",
         f"- output: `logits`, float32 `(N, {arch.num_classes})`",
         "- layers: " + ", ".join(f"`{t}`" for t in arch.describe()), "",
         "## Compression report", "", *compression_tables(rep), ""]
    files = {"flax": FILES["flax"], "onnx": FILES["onnx"]}
    if rep.shipped_bytes is not None:
        files["int8"] = FILES["int8"]
    L += how_to_load(arch, name, files)
    return "\n".join(L)
