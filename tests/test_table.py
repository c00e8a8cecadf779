import json

import numpy as np
import pytest

from evaluators.table import TABLES, TableEvaluator, resolve_table
from search_spaces.catalog import SPACES
from search_spaces.errors import NasError


@pytest.fixture(scope="module")
def table(macro_table_path):
    return TableEvaluator(macro_table_path)


def test_lookup_by_key_and_arch(table):
    space = SPACES.get("macro_cifar")
    assert len(table) == 6561
    r = table.evaluate("22212202")
    assert r["accuracy"] == pytest.approx(93.12666, abs=1e-4)
    assert set(r) == {"accuracy", "params", "flops"}
    assert table.evaluate(space.decode("22212202")) == r
    assert table.best() [1] == pytest.approx(93.12666, abs=1e-4)
    cap = table.best(lambda k, e: e["flops"] <= 45.5e6)
    assert cap[1] == pytest.approx(91.94, abs=1e-3)


def test_sampled_repeats(macro_table_path, table):
    runs = table.entry("22212202")["test_acc"]
    rep = TableEvaluator(macro_table_path, sample_repeat=True)
    rng = np.random.default_rng(0)
    vals = [rep.evaluate("22212202", rng)["accuracy"] for _ in range(30)]
    assert set(vals) <= set(runs) and len(set(vals)) > 1
    again = [rep.evaluate("22212202", np.random.default_rng(0))["accuracy"] for _ in range(3)]
    assert len(set(again)) == 1


def test_missing_key_names_file_and_key(table, macro_table_path):
    with pytest.raises(NasError, match=r"nas-bench-macro_cifar10\.json.*'22212203'"):
        table.evaluate("22212203")


def test_metric_and_file_errors(tmp_path, macro_table_path):
    with pytest.raises(NasError, match="unknown metric 'top1'; allowed: .*mean_acc"):
        TableEvaluator(macro_table_path, metric="top1")
    with pytest.raises(NasError, match="not found"):
        TableEvaluator(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"0000": {"test_acc": [1]')
    with pytest.raises(NasError, match="not valid JSON") as e:
        TableEvaluator(bad)
    assert "\n" not in str(e.value)
    bad.write_text(json.dumps({"00": {"mean_acc": 1.0}}))
    with pytest.raises(NasError, match="entry '00' lacks test_acc"):
        TableEvaluator(bad)


def entry(acc=90.0):
    return {"test_acc": [acc], "mean_acc": acc, "std": 0.0, "params": 1, "flops": 1}


def test_check_space(table, tmp_path):
    table.check_space(SPACES.get("macro_cifar"))
    with pytest.raises(NasError, match="table keys have 8 characters but space 'mobile_small' keys have 15"):
        table.check_space(SPACES.get("mobile_small"))
    # right length and count, a character out of range
    data = {k: entry() for k in SPACES.get("macro_cifar").keys()}
    del data["22222222"]
    data["22222223"] = entry()
    path = tmp_path / "t.json"
    path.write_text(json.dumps(data))
    with pytest.raises(NasError, match="key '22222223' .* not an architecture of space 'macro_cifar'"):
        TableEvaluator(path).check_space(SPACES.get("macro_cifar"))
    del data["22222223"]
    path.write_text(json.dumps(data))
    with pytest.raises(NasError, match="6560 keys but space 'macro_cifar' has 6561"):
        TableEvaluator(path).check_space(SPACES.get("macro_cifar"))


# ---------------------------------------------------------------- named tables shipped with the package
def test_a_named_table_is_the_packaged_file_with_its_license_beside_it(macro_table_path):
    path = resolve_table("nas-bench-macro")
    assert path.is_absolute() and path.parent.name == "tables" and path.parent.parent.name == "evaluators"
    assert "Apache License" in (path.parent / "NAS-Bench-Macro.LICENSE").read_text()
    assert "xiusu/NAS-Bench-Macro" in (path.parent / "README.md").read_text()
    assert set(TABLES) == {"nas-bench-macro"}
    assert len(TableEvaluator(path)) == 3 ** 8  # 8 layers, 3 choices each


def test_a_table_path_is_made_absolute_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "t.json").write_text(json.dumps({"0": entry()}))
    monkeypatch.chdir(tmp_path)
    assert resolve_table("sub/t.json") == tmp_path.resolve() / "sub" / "t.json"
    assert resolve_table(tmp_path / "sub" / "t.json") == tmp_path.resolve() / "sub" / "t.json"


def test_neither_a_name_nor_a_file_is_one_line_listing_the_known_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NasError, match=r"'nas-bench-micro' is neither a known table \(nas-bench-macro\) nor a file") as e:
        resolve_table("nas-bench-micro")
    assert "\n" not in str(e.value) and str(tmp_path.resolve() / "nas-bench-micro") in str(e.value)
