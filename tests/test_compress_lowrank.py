"""Low-rank factorization: the factorized network is a first-class Architecture, exactly costed,
and at full rank computes what the original computes.

The hand-built network of test_compress_prune covers every factorizable site: a ds pointwise conv,
mb expand and project convs (with SE and a residual add), an mb without expansion (project only),
a skip layer's 1x1 shortcut, the head conv and the classifier.
"""

from __future__ import annotations

import json

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from evaluators.cost import analytic_cost
from evaluators.lowrank import LowRankTarget, choose_ranks, energy_rank, factorize, sites
from evaluators.onnx_export import ort_session, run, to_onnx
from evaluators.predict import predict_logits
from evaluators.qat import export_variables, fold, forward
from evaluators.signatures import arch_signatures
from evaluators.variables import check_variables
from search_spaces.architecture import Architecture
from search_spaces.errors import NasError, SpaceError
from search_spaces.model import build_model, input_shape
from test_compress_prune import ARCH, n_values, random_variables

EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def variables():
    return random_variables(ARCH, seed=5)


@pytest.fixture(scope="module")
def full(variables):
    """Every site factorized at full rank min(cin, cout): an exact rewrite of the network."""
    return factorize(ARCH, variables, {st: min(st.cin, st.cout) for st in sites(ARCH)})


@pytest.fixture(scope="module")
def half(variables):
    return factorize(ARCH, variables, LowRankTarget.parse("params=0.6"))


def images(n=8, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 8, 8, 1)).astype(np.float32)


def float32_bound(logits: np.ndarray) -> float:
    """Worst-case float32 rounding of the factorized network against the original: each factorized
    site adds one matrix product of at most K = max channels terms (error <= K eps |terms|), and
    the sites' errors add up through the network."""
    k = max(max(st.cin, st.cout) for st in sites(ARCH))
    return len(sites(ARCH)) * k * EPS32 * max(1.0, float(np.abs(logits).max()))


def flax_macs(arch: Architecture, variables) -> int:
    """Multiply-accumulates of the built Flax model at batch 1, read off its jaxpr: every
    convolution and matrix product, from its operand and output shapes."""
    net = build_model(arch, "reference")
    jaxpr = jax.make_jaxpr(lambda v, x: net.apply(v, x, train=False))(variables, jnp.zeros(input_shape(arch)))

    def count(jx) -> int:
        total = 0
        for eqn in jx.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                rhs = eqn.invars[1].aval.shape  # HWIO
                per_out = rhs[0] * rhs[1] * rhs[2]  # kh * kw * (cin / groups)
                total += per_out * int(np.prod(eqn.outvars[0].aval.shape))
            elif eqn.primitive.name == "dot_general":
                (contract, _), _ = eqn.params["dimension_numbers"]
                k = int(np.prod([eqn.invars[0].aval.shape[d] for d in contract]))
                total += k * int(np.prod(eqn.outvars[0].aval.shape))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                total += count(sub)
        return total

    return count(jaxpr.jaxpr)


def test_full_rank_factorization_computes_the_original(variables, full):
    small, sv, _ = full
    x = images()
    want = predict_logits(ARCH, variables, x)
    got = predict_logits(small, sv, x)
    assert small.factorized and small.key.startswith("hand~lr")
    np.testing.assert_allclose(got, want, rtol=0, atol=float32_bound(want))


def test_every_1x1_conv_and_the_classifier_is_a_site():
    got = {st.label() for st in sites(ARCH)}
    assert got == {"layer0.pw", "layer1.expand", "layer1.project", "layer3.expand", "layer3.project",
                   "layer4.project", "layer5.shortcut", "head.conv", "head.classifier"}


@pytest.mark.parametrize("which", ["full", "half"])
def test_params_and_macs_of_the_factorized_architecture_are_those_of_the_built_model(which, request):
    small, sv, _ = request.getfixturevalue(which)
    check_variables(small, sv)  # the variables fit the model the architecture builds
    cost = analytic_cost(small)
    assert cost.params == n_values(sv["params"])
    assert cost.macs == flax_macs(small, sv)


def test_the_original_counts_agree_the_same_way(variables):
    assert analytic_cost(ARCH).macs == flax_macs(ARCH, variables)


def test_a_params_target_is_met_and_only_paying_layers_are_factorized(variables, half):
    small, _, records = half
    assert analytic_cost(small).params <= 0.6 * analytic_cost(ARCH).params
    assert small.key == f"hand~lr{analytic_cost(small).params / analytic_cost(ARCH).params:.2f}"
    for st, rec in zip(sites(ARCH), records):
        if rec["rank"] is not None:
            assert rec["rank"] * (st.cin + st.cout) < st.cin * st.cout and 0 < rec["energy"] < 1


@pytest.mark.parametrize("divisor", [4, 8])
def test_ranks_are_multiples_of_the_divisor_and_keep_at_least_the_energy(variables, divisor):
    _, _, records = factorize(ARCH, variables, LowRankTarget.parse("energy=0.8"), divisor)
    ranked = [r for r in records if r["rank"] is not None]
    assert ranked
    for r in ranked:
        assert (r["rank"] % divisor == 0 or r["rank"] == r["full_rank"]) and r["energy"] >= 0.8
        assert r["rank"] * (r["cin"] + r["cout"]) < r["cin"] * r["cout"]


def test_energy_one_keeps_every_layer_whole(variables):
    # full rank never costs less than the layer: min(cin, cout) (cin + cout) >= cin cout
    small, sv, records = factorize(ARCH, variables, LowRankTarget.parse("energy=1"))
    assert not small.factorized and all(r["rank"] is None for r in records)


def test_the_energy_rank_keeps_at_least_that_energy():
    s = np.array([4.0, 2.0, 1.0, 1.0])  # squared: 16, 4, 1, 1 of 22
    assert [energy_rank(s, e) for e in (0.5, 16 / 22, 0.8, 21 / 22, 1.0)] == [1, 1, 2, 3, 4]


def test_an_unreachable_params_target_names_the_key_and_the_least_allowed(variables):
    with pytest.raises(NasError, match=r"compress.lowrank: params=0.01 is below what rank 1 .* allowed params >= 0\.\d+"):
        choose_ranks(ARCH, variables, LowRankTarget.parse("params=0.01"))


@pytest.mark.parametrize("spec, message", [
    ("energy=1.5", "energy=1.5; allowed a fraction in (0, 1]"),
    ("energy=0", "energy=0; allowed a fraction in (0, 1]"),
    ("rank=4", "unknown key 'rank'; allowed energy=F"),
    ("params", "unknown key 'params'; allowed energy=F"),
])
def test_bad_targets_are_refused_by_name(spec, message):
    with pytest.raises(NasError, match=f"^--lowrank: {message.replace('(', '[(]').replace(')', '[)]')}"):
        LowRankTarget.parse(spec)


@pytest.mark.parametrize("value, target, tag", [
    (True, LowRankTarget("energy", 0.9), "lowrank-energy90"),
    ("energy=0.8", LowRankTarget("energy", 0.8), "lowrank-energy80"),
    ("params=0.5", LowRankTarget("params", 0.5), "lowrank-params50"),
    ("macs=0.7", LowRankTarget("macs", 0.7), "lowrank-macs70"),
])
def test_the_compress_section_takes_lowrank(value, target, tag):
    from nas.config import CompressConfig

    c = CompressConfig.from_dict({"lowrank": value}, "exp.yaml: compress")
    assert c.lowrank_target() == target and c.tag() == tag and c.target() is None


@pytest.mark.parametrize("value, message", [
    (1, "exp.yaml: compress.lowrank: 1; allowed true or energy=F"),
    ("energy=0", "exp.yaml: compress.lowrank: energy=0; allowed a fraction in (0, 1]"),
    ("svd=0.5", "exp.yaml: compress.lowrank: unknown key 'svd'; allowed energy=F"),
])
def test_a_bad_lowrank_in_the_compress_section_is_one_line_naming_the_key(value, message):
    from nas.config import CompressConfig

    with pytest.raises(NasError) as e:
        CompressConfig.from_dict({"lowrank": value}, "exp.yaml: compress")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_the_json_form_round_trips_and_an_unfactorized_one_is_unchanged(half):
    small = half[0]
    doc = small.to_dict()
    assert any("ranks" in layer for layer in doc["layers"])
    assert Architecture.from_json(small.to_json()) == small
    plain = json.loads(ARCH.to_json())
    assert "ranks" not in plain["head"] and all("ranks" not in layer for layer in plain["layers"])
    assert Architecture.from_json(ARCH.to_json()).to_json() == ARCH.to_json()


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["layers"][0].update(ranks={"expand": 4}), r"layers\[0\].ranks: unknown conv 'expand'; allowed: pw"),
    (lambda d: d["layers"][0].update(ranks={"pw": 17}), r"layers\[0\].ranks.pw: rank 17; allowed an integer in \[1, 16\]"),
    (lambda d: d["head"].update(ranks={"classifier": 0}), r"head.ranks.classifier: rank 0; allowed an integer in \[1, 10\]"),
    (lambda d: d["layers"][2].update(ranks={"shortcut": 4}), "unknown conv 'shortcut'; allowed: none"),
])
def test_bad_ranks_in_json_are_refused_by_name(edit, message):
    d = ARCH.to_dict()
    edit(d)
    with pytest.raises(SpaceError, match=message):
        Architecture.from_dict(d)


def test_a_factorized_layer_has_its_own_latency_signature(half):
    small = half[0]
    before = [s.key() for s in arch_signatures(ARCH)]
    after = [s.key() for s in arch_signatures(small)]
    changed = {i for i, (a, b) in enumerate(zip(before, after)) if a != b}
    factorized = {i + 1 for i, ly in enumerate(small.layers) if ly.ranks} | ({len(after) - 1} if small.head.ranks else set())
    assert changed == factorized and factorized


def test_the_onnx_export_of_a_factorized_model_matches_flax_in_onnx_runtime(half):
    small, sv, _ = half
    x = images(16, seed=1)
    want = predict_logits(small, sv, x)
    got = run(ort_session(to_onnx(small, sv)), x)
    np.testing.assert_allclose(got, want, rtol=0, atol=float32_bound(want))


def test_qat_folding_of_a_factorized_model_is_exact_and_exports_back(half):
    small, sv, _ = half
    x = images()
    folded = fold(small, sv)
    want = predict_logits(small, sv, x)
    got = np.asarray(jax.jit(lambda f, xb: forward(small, f, xb, None))(jax.tree.map(jnp.asarray, folded), x))
    np.testing.assert_allclose(got, want, rtol=0, atol=float32_bound(want))
    check_variables(small, export_variables(small, folded))


# ============================================================ the stage, end to end (the run of test_compress_stage)
from test_compress_stage import KEY, QUIET, data, run_dir  # noqa: E402,F401  (module fixtures: a tiny trained run)


@pytest.fixture(scope="module")
def lowrank_folder(run_dir, tmp_path_factory):
    from nas.cli import main

    out = tmp_path_factory.mktemp("lowrank-out")
    assert main(["compress", str(run_dir), "--winner", "1", "--lowrank", "--lowrank-epochs", "1", "--lowrank-keep",
                 "cost", "--divisor", "1", "--out", str(out)]) == 0
    (folder,) = out.iterdir()
    return folder


@pytest.mark.slow
def test_nas_compress_lowrank_writes_a_factorized_model_nas_load_runs(lowrank_folder, data):
    import nas

    assert lowrank_folder.name == f"01-{KEY}-lowrank-energy90"
    flax_model, onnx_model = nas.load(lowrank_folder), nas.load(lowrank_folder, format="onnx")
    arch = flax_model.arch
    assert arch.factorized and arch.key.startswith(f"{KEY}~lr") and onnx_model.arch == arch
    m = json.loads((lowrank_folder / "metrics.json").read_text())
    lr = m["lowrank"]
    assert lr["target"] == "energy=0.9" and lr["factorized"] == sum(r["rank"] is not None for r in lr["layers"]) > 0
    assert m["params"]["after"] == analytic_cost(arch).params < m["params"]["before"]
    assert set(lr["speedup"]) == {"batch1", "batch32"} and set(lr["latency_ms"]) == {"whole", "factorized"}
    x = data.x_test[:64]
    np.testing.assert_allclose(onnx_model(x), flax_model(x), atol=1e-4)
    assert flax_model.accuracy(data.x_test, data.y_test) == pytest.approx(m["test_accuracy"])


@pytest.mark.slow
def test_nas_cost_costs_the_factorized_architecture(lowrank_folder, capsys):
    import nas
    from nas.cli import main

    assert main(["cost", "--arch-file", str(lowrank_folder / "architecture.json"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    arch = nas.load(lowrank_folder).arch
    assert doc["key"] == arch.key and doc["params"] == analytic_cost(arch).params and doc["latency_ms"]["rpi4"] > 0
    assert doc["latency_method"]["host"] == "analytic"  # no look-up table has factorized layers


@pytest.mark.slow
def test_prune_then_lowrank_then_qat_chain_in_that_order(run_dir, tmp_path, data):
    import nas
    from nas.compress import run_compress

    (folder,) = run_compress(run_dir, winner=1, out=tmp_path, options={
        "prune": "macs=0.7", "epochs": 1, "lowrank": "params=0.8", "lowrank_epochs": 1, "qat": True, "divisor": 1,
        "qat_epochs": 1, "latency_budget_s": 0}, **QUIET)
    assert folder.name == f"01-{KEY}-prune-macs70-l1-lowrank-params80-qat"
    arch = nas.load(folder).arch
    assert arch.factorized and arch.key.startswith(f"{KEY}~p0.") and "~lr0." in arch.key
    m = json.loads((folder / "metrics.json").read_text())
    assert m["lowrank"]["key_before"].startswith(f"{KEY}~p0.") and m["lowrank"]["params_kept"] <= 0.8
    int8 = nas.load(folder, format="int8")
    assert int8.accuracy(data.x_test, data.y_test) == pytest.approx(m["int8"]["test_accuracy"])


@pytest.mark.slow
@pytest.mark.parametrize("argv, message", [
    (["--lowrank", "energy=1.5"], "compress.lowrank: energy=1.5; allowed a fraction in (0, 1]"),
    (["--lowrank", "rank=4"], "compress.lowrank: unknown key 'rank'; allowed energy=F"),
    (["--lowrank", "params=0.01"], "compress.lowrank: params=0.01 is below what rank 16 (compress.divisor) in every layer"),
])
def test_bad_lowrank_input_is_one_line_exit_2_and_nothing_written(run_dir, capsys, argv, message, tmp_path):
    from nas.cli import main

    out = tmp_path / "out"
    assert main(["compress", str(run_dir), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow
def test_the_latency_gate_keeps_exactly_the_layers_measured_faster(run_dir, tmp_path):
    from nas.compress import run_compress

    (folder,) = run_compress(run_dir, winner=1, out=tmp_path, options={
        "lowrank": "energy=0.8", "lowrank_epochs": 0, "lowrank_keep": "latency", "latency_budget_s": 0.02, "divisor": 1},
        **QUIET)
    m = json.loads((folder / "metrics.json").read_text())["lowrank"]
    measured = m["measured_layers"]
    assert measured, "energy=0.8 makes some layer cheaper to factorize, so it is measured"
    factorized_layers = {r["layer"].split(".")[0] for r in m["layers"] if r["rank"] is not None}
    for rec in measured:
        faster = rec["speedup"]["batch1"] > 1 and rec["speedup"]["batch32"] > 1
        assert rec["kept"] == faster
        owner = "head" if rec["layer"] == "head" else f"layer{rec['index'] - 1}"
        assert (owner in factorized_layers) == faster
