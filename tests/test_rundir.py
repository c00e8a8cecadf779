"""The run-directory model (nas.rundir): typed records read back what the writers wrote, and run
directories written by earlier versions (distill.json without a baseline, `latency_ms@P` columns) still load."""

from __future__ import annotations

import json
import math

import pytest

from nas.rundir import (DistillRow, Winner, append_finished, load_winners, read_distill, read_finished, read_trials,
                        read_winners, result_column, suggestion_id, winner_weights, write_trials, write_winners)
from search_spaces.catalog import load_space
from search_spaces.errors import NasError

SPACE = load_space("mobile_small").with_input(resolution=8)
KEY = "100-100--100--1"


def _winner(rank: int = 1, checkpoint: str | None = "winners/01") -> Winner:
    return Winner(rank=rank, key=KEY, space=SPACE.name, trial_id="t_00001", score=0.91, val_accuracy=0.93,
                  params=12345, macs=678901, architecture=SPACE.decode(KEY), checkpoint=checkpoint)


def test_winners_round_trip_through_winners_json(tmp_path):
    write_winners(tmp_path, [_winner(1), _winner(2, "winners/02")])
    back = read_winners(tmp_path)
    assert back == [_winner(1), _winner(2, "winners/02")]
    assert json.loads((tmp_path / "winners.json").read_text())[0]["architecture"] == SPACE.decode(KEY).to_dict()


def test_a_table_search_has_winners_without_weights_and_distill_refuses_them(tmp_path):
    write_winners(tmp_path, [_winner(checkpoint=None)])
    assert load_winners(tmp_path, with_weights=False)[0].checkpoint is None
    with pytest.raises(NasError, match="no trained weights"):
        load_winners(tmp_path)


def test_a_malformed_winner_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "winners.json").write_text(json.dumps([{"rank": 1, "key": KEY}]))
    with pytest.raises(NasError, match=r"winners.json: malformed winner entry \(KeyError") as e:
        read_winners(tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("row, after, baseline, gain", [
    ({"rank": 1, "key": "k", "test_accuracy_before": 0.5, "test_accuracy_after": 0.6}, 0.6, math.nan, math.nan),
    ({"rank": 1, "key": "k", "test_accuracy_before": 0.5, "baseline_acc": 0.55, "kd_acc": 0.7, "gain": 0.15,
      "distilled": "distilled.msgpack"}, 0.7, 0.55, 0.15),
], ids=["first-schema", "with-baseline"])
def test_both_distill_json_schemas_read_as_one_record(tmp_path, row, after, baseline, gain):
    (tmp_path / "distill.json").write_text(json.dumps({"teacher": {"key": "t"}, "seeds": 2, "winners": [row]}))
    report = read_distill(tmp_path)
    r = report.row(1)
    assert isinstance(r, DistillRow) and r.before == 0.5 and r.after == after
    assert (math.isnan(r.baseline) and math.isnan(baseline)) or r.baseline == baseline
    assert (math.isnan(r.gain) and math.isnan(gain)) or r.gain == pytest.approx(gain)
    assert report.teacher == {"key": "t"} and report.seeds == 2 and report.row(2) is None


def test_no_distill_json_is_none_and_a_broken_one_is_one_line(tmp_path):
    assert read_distill(tmp_path) is None
    (tmp_path / "distill.json").write_text("{")
    with pytest.raises(NasError, match="distill.json: malformed distillation report"):
        read_distill(tmp_path)


def test_winner_weights_prefer_the_distilled_student_and_refuse_a_missing_file(tmp_path):
    w = _winner()
    folder = tmp_path / "winners" / "01"
    folder.mkdir(parents=True)
    (folder / "variables.msgpack").write_bytes(b"x")
    assert winner_weights(tmp_path, w) == folder / "variables.msgpack"
    (tmp_path / "distill.json").write_text(json.dumps({"winners": [{"rank": 1, "key": KEY,
                                                                     "distilled": "distilled.msgpack"}]}))
    with pytest.raises(NasError, match="distilled.msgpack: checkpoint missing"):
        winner_weights(tmp_path, w, read_distill(tmp_path))


def test_trials_csv_written_with_the_at_spelling_reads_with_result_columns(tmp_path):
    (tmp_path / "trials.csv").write_text("trial_id,key,status,latency_ms@host\nt1,k,ok,1.5\n")
    assert read_trials(tmp_path) == [{"trial_id": "t1", "key": "k", "status": "ok", "latency_ms_at_host": "1.5"}]
    assert result_column("latency_ms@rpi4") == "latency_ms_at_rpi4" and result_column("params") == "params"


def test_trials_csv_round_trip_keeps_the_fixed_columns_first(tmp_path):
    write_trials(tmp_path, [{"trial_id": "t1", "key": "k", "status": "ok", "latency_ms_at_host": 2.0,
                             "checkpoint": "/somewhere"}])
    header = (tmp_path / "trials.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["suggestion", "trial_id", "key", "status"] and header[-1] == "latency_ms_at_host"
    assert "checkpoint" not in header
    with pytest.raises(NasError, match="no trials.csv"):
        read_trials(tmp_path / "elsewhere")


def test_finished_log_skips_a_line_cut_short_by_a_kill(tmp_path):
    append_finished(tmp_path, "t1", {"suggestion": 1, "key": "a", "score": 0.5})
    with (tmp_path / "finished.jsonl").open("a") as f:
        f.write('{"trial_id": "t2", "res')
    got = read_finished(tmp_path)
    assert got["t1"]["score"] == 0.5 and got[suggestion_id({"suggestion": 1, "key": "a"})]["score"] == 0.5
    assert "t2" not in got
