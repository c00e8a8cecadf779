"""Watch a search while it runs: TensorBoard event files and live terminal progress (Ray-free).

`SearchMonitor` is fed plain dicts (the per-epoch results a trial reports) by a thin adapter in
the driver (`nas.tune.progress`, `nas.batched_search`), and writes, under ``RUN_DIR/tensorboard/``:

* ``trials/<trial_id>-<key>/``: per trial, ``trial/train_loss``, ``trial/val_loss`` and
  ``trial/val_accuracy`` at step = epoch; at the end ``result/accuracy``, ``result/score``,
  ``result/params``, ``result/macs``, ``result/latency_ms`` and an HParams session whose
  hyperparameters are the architecture decisions (option labels, ``-`` for an inactive layer),
  the key and the status, so TensorBoard's HParams view can filter and sort trials by choice.
* ``search/``: ``search/best_score``, ``search/best_accuracy``, ``search/failed``,
  ``search/infeasible``, ``search/running`` at step = trials finished, the Pareto front
  (accuracy vs predicted latency and vs params) as the image ``search/pareto_front``, and the
  HParams experiment (the columns and their discrete domains).

On a terminal it shows a live status line (rich); otherwise it prints one plain line per event
(trial started, finished, failed, infeasible candidate), so CI logs stay readable.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping, TextIO

from nas.hparams import STATUSES, experiment_summary, session_summaries
from nas.messages import last_line
from nas.plots import pareto_figure, predicted_latency_ms, render_rgb
from nas.rundir import INFEASIBLE, RESULT_LATENCY_PREFIX, finite_float
from search_spaces.space import SearchSpace

TRIAL_SCALARS = ("train_loss", "val_loss", "val_accuracy")
RESULT_SCALARS = ("accuracy", "score", "params", "macs", "latency_ms")


def latency_of(result: Mapping[str, Any]) -> tuple[float, str]:
    """(predicted latency in ms, profile) from the first `latency_ms_at_<profile>` field of a result."""
    for k, v in result.items():
        if k.startswith(RESULT_LATENCY_PREFIX) and math.isfinite(finite_float(v)):
            return finite_float(v), k[len(RESULT_LATENCY_PREFIX):]
    return math.nan, ""


def _fmt_s(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class SearchMonitor:
    """TensorBoard summaries and terminal progress for one search, fed plain result dicts.

    Args:
      run_dir: the run directory; event files go to ``run_dir/tensorboard/``.
      space: the search space (its decisions become the HParams columns).
      total_trials: trials the search will train (infeasible candidates do not count).
      stream: where progress goes (default sys.stdout).
      tty: live rich display (True) or plain lines (False); None: ``stream.isatty()``.
      latency_profile: hardware profile for the latency of results that carry none
        (predicted with `evaluators.hardware.analytic_latency`).
      clock: time source (tests).

    Call `trial_started`, `trial_result` (every epoch), `trial_completed` or `trial_failed`,
    `infeasible` (or let the monitor read ``infeasible.jsonl``), then `close()`.

    Example:
      >>> mon = SearchMonitor(run_dir, space, total_trials=12)
      >>> mon.trial_started("t1"); mon.trial_result("t1", {"key": k, "epochs": 1, "val_loss": 0.4, ...})
      >>> mon.trial_completed("t1", last_result); mon.close()
    """

    def __init__(self, run_dir: str | Path, space: SearchSpace, total_trials: int, *,
                 stream: TextIO | None = None, tty: bool | None = None, latency_profile: str = "host",
                 clock=time.time):
        self.run_dir = Path(run_dir)
        self.space = space
        self.total = int(total_trials)
        self.stream = stream if stream is not None else sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else bool(tty)
        self.latency_profile = latency_profile
        self.clock = clock
        self.start = clock()
        self.tb_dir = self.run_dir / "tensorboard"
        self.trials: dict[str, dict[str, Any]] = {}  # trial_id -> {status, key, last, started}
        self.infeasible_keys: set[str] = set()
        self.finished = 0
        self.best_score = -math.inf
        self.best_accuracy = -math.inf
        self.best_key = ""
        self.completed: list[dict[str, Any]] = []  # final results of ok/stopped trials (Pareto image)
        self._writers: dict[str, Any] = {}
        self._lock = threading.RLock()
        self._infeasible_offset = 0
        self._closed = False
        self._decisions = space.decisions()
        from tensorboardX import SummaryWriter

        self._search = SummaryWriter(logdir=str(self.tb_dir / "search"), flush_secs=10)
        self._search.file_writer.add_summary(experiment_summary(
            f"{space.name} search", self._decisions, [f"result/{m}" for m in RESULT_SCALARS] + ["trial/val_accuracy"],
            self.start))
        self._search.flush()
        self._live = None
        if self.tty:
            self._start_live()
        self._sync_infeasible(announce=False)

    # ------------------------------------------------------------------ events
    def trial_started(self, trial_id: str) -> None:
        """A trial started training (Tune: on_trial_start)."""
        with self._lock:
            t = self._trial(trial_id)
            t["status"] = "running"
            self._emit(f"start   {trial_id}")
            self._sync_infeasible()

    def trial_result(self, trial_id: str, result: Mapping[str, Any]) -> None:
        """One per-epoch result (Tune: on_trial_result): per-trial scalars at step = epoch."""
        with self._lock:
            t = self._trial(trial_id)
            t["last"] = dict(result)
            if result.get("key"):
                t["key"] = str(result["key"])
            if t["status"] == "pending":
                t["status"] = "running"
            if result.get("status") == "infeasible":
                return
            step = _step(result)
            w = self._trial_writer(trial_id)
            for name in TRIAL_SCALARS:
                v = finite_float(result.get(name))
                if math.isfinite(v):
                    w.add_scalar(f"trial/{name}", v, step)
            w.flush()
            if self._live is not None:
                self._live.refresh()

    def trial_completed(self, trial_id: str, result: Mapping[str, Any] | None = None) -> None:
        """A trial ended normally (Tune: on_trial_complete) with its last result."""
        with self._lock:
            t = self._trial(trial_id)
            if t["status"] in STATUSES:
                return  # already counted
            r = dict(result or t.get("last") or {})
            t["last"] = r or t.get("last") or {}
            if r.get("key"):
                t["key"] = str(r["key"])
            status = str(r.get("status") or "ok")
            status = {"running": "stopped"}.get(status, status)  # a scheduler ended it early
            if status not in STATUSES:
                status = "ok"
            t["status"] = status
            self.finished += 1
            score, acc = finite_float(r.get("score")), finite_float(r.get("accuracy", r.get("val_accuracy")))
            if status == "infeasible":
                self._add_infeasible(t.get("key", ""), announce=False)
            elif math.isfinite(acc):
                if status == "ok":  # like the winners: only trials trained to the end count as best
                    if math.isfinite(score) and score > self.best_score:
                        self.best_score, self.best_key = score, t.get("key", "")
                    self.best_accuracy = max(self.best_accuracy, acc)
                self.completed.append({**r, "latency_ms": self._latency(r, t.get("key", ""))})
            self._finish_trial(trial_id, t, r, status)
            self._sync_infeasible()
            self._search_scalars()
            if status in ("ok", "stopped") and math.isfinite(acc):
                self._pareto_image()
            what = f"{status:<7} {trial_id} {t.get('key', '?')}"
            if math.isfinite(acc):
                what += f" acc {acc:.4f} score {score:.4f}"
            self._emit(what, counted=True)

    def trial_failed(self, trial_id: str, error: str = "") -> None:
        """A trial crashed or diverged (Tune: on_trial_error)."""
        with self._lock:
            t = self._trial(trial_id)
            if t["status"] in STATUSES:
                return
            t["status"] = "failed"
            t["error"] = last_line(error)
            self.finished += 1
            self._finish_trial(trial_id, t, t.get("last") or {}, "failed")
            self._sync_infeasible()
            self._search_scalars()
            self._emit(f"failed  {trial_id} {t.get('key', '?')}: {t['error'] or 'error'}", counted=True)

    def infeasible(self, record: Mapping[str, Any]) -> None:
        """A candidate rejected by the hard constraints before training (an infeasible.jsonl record)."""
        with self._lock:
            self._add_infeasible(str(record.get("key", "")), error=str(record.get("error", "")))

    def close(self) -> None:
        """Flush and close every event file and the live display; print a final summary line."""
        with self._lock:
            if self._closed:
                return
            self._sync_infeasible()
            self._closed = True
            for tid in list(self._writers):
                self._writers.pop(tid).close()
            self._search.close()
            if self._live is not None:
                self._live.stop()
                self._live = None
            best = f"{self.best_score:.4f} ({self.best_key})" if self.best_score > -math.inf else "-"
            self._write(f"search finished: {self._counts_text()} | best score {best} | "
                        f"{_fmt_s(self.clock() - self.start)} elapsed | tensorboard --logdir {self.run_dir}")

    def __enter__(self) -> "SearchMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ counts
    def counts(self) -> dict[str, int]:
        """done/total, running, failed, infeasible (as plain numbers)."""
        st = [t["status"] for t in list(self.trials.values())]
        return {"done": self.finished, "total": self.total, "running": st.count("running"),
                "ok": st.count("ok"), "stopped": st.count("stopped"), "failed": st.count("failed"),
                "infeasible": len(self.infeasible_keys)}

    def eta_s(self) -> float:
        """Estimated seconds left: elapsed per finished trial times trials left (NaN before the first)."""
        if not self.finished:
            return math.nan
        return (self.clock() - self.start) / self.finished * max(self.total - self.finished, 0)

    def _counts_text(self) -> str:
        c = self.counts()
        return (f"{c['done']}/{c['total']} done, running {c['running']}, failed {c['failed']}, "
                f"infeasible {c['infeasible']}")

    # ------------------------------------------------------------------ internals
    def _trial(self, trial_id: str) -> dict[str, Any]:
        return self.trials.setdefault(str(trial_id), {"status": "pending", "started": self.clock()})

    def _trial_writer(self, trial_id: str):
        w = self._writers.get(trial_id)
        if w is None:
            from tensorboardX import SummaryWriter

            key = self.trials[trial_id].get("key")
            name = f"{trial_id}-{key}" if key else str(trial_id)
            self.trials[trial_id]["run"] = name
            w = self._writers[trial_id] = SummaryWriter(logdir=str(self.tb_dir / "trials" / name), flush_secs=10)
        return w

    def _latency(self, r: Mapping[str, Any], key: str) -> float:
        lat, _ = latency_of(r)
        if math.isfinite(lat) or not key:
            return lat
        try:
            return predicted_latency_ms(self.space.decode(key), self.latency_profile)
        except Exception:  # noqa: BLE001 - a bad key must not stop the search
            return math.nan

    def _finish_trial(self, trial_id: str, t: dict[str, Any], r: Mapping[str, Any], status: str) -> None:
        w = self._trial_writer(trial_id)
        step = _step(r)
        metrics = {} if status == "failed" else {  # a crashed trial has no result, only its curves
            "accuracy": finite_float(r.get("accuracy", r.get("val_accuracy"))), "score": finite_float(r.get("score")),
            "params": finite_float(r.get("params")), "macs": finite_float(r.get("macs")),
            "latency_ms": self._latency(r, t.get("key", ""))}
        for name, v in metrics.items():
            if math.isfinite(v):
                w.add_scalar(f"result/{name}", v, step)
        ssi, sei = session_summaries(self._decisions, t.get("key", ""), status, self.clock(), self.clock())
        w.file_writer.add_summary(ssi)
        w.file_writer.add_summary(sei)
        w.close()
        self._writers.pop(trial_id, None)

    def _search_scalars(self) -> None:
        step, c = self.finished, self.counts()
        w = self._search
        if self.best_score > -math.inf:
            w.add_scalar("search/best_score", self.best_score, step)
        if self.best_accuracy > -math.inf:
            w.add_scalar("search/best_accuracy", self.best_accuracy, step)
        w.add_scalar("search/failed", c["failed"], step)
        w.add_scalar("search/infeasible", c["infeasible"], step)
        w.add_scalar("search/running", c["running"], step)
        w.flush()

    def _pareto_image(self) -> None:
        try:
            fig = pareto_figure(self.completed, latency_label="predicted latency (ms)")
            self._search.add_image("search/pareto_front", render_rgb(fig), self.finished, dataformats="HWC")
            self._search.flush()
        except Exception as e:  # noqa: BLE001 - a plotting problem must not stop the search
            self._write(f"(pareto image skipped: {type(e).__name__}: {e})")

    def _add_infeasible(self, key: str, error: str = "", announce: bool = True) -> None:
        if not key or key in self.infeasible_keys:
            return
        self.infeasible_keys.add(key)
        if announce:
            self._emit(f"infeasible {key}" + (f": {error}" if error else ""))

    def _sync_infeasible(self, announce: bool = True) -> None:
        """Pick up candidates the searcher appended to RUN_DIR/infeasible.jsonl since the last look."""
        path = self.run_dir / INFEASIBLE
        try:
            size = path.stat().st_size
        except OSError:
            return
        if size <= self._infeasible_offset:
            return
        with path.open("rb") as f:
            f.seek(self._infeasible_offset)
            chunk = f.read()
        end = chunk.rfind(b"\n")  # leave a half-written last line for next time
        if end < 0:
            return
        self._infeasible_offset += end + 1
        complete = chunk[:end].decode(errors="replace")
        for line in complete.splitlines():
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not rec.get("proposed", True):
                    continue  # screened by a strategy while choosing, never proposed
                self._add_infeasible(str(rec.get("key", "")), str(rec.get("error", "")), announce)

    # ------------------------------------------------------------------ output
    def _status_text(self) -> str:
        elapsed = self.clock() - self.start
        eta = self.eta_s()
        best = f"{self.best_score:.4f}" if self.best_score > -math.inf else "-"
        c = self.counts()
        return (f"running {c['running']} failed {c['failed']} infeasible {c['infeasible']} | best score {best} | "
                f"{_fmt_s(elapsed)} elapsed, " + (f"~{_fmt_s(eta)} left" if math.isfinite(eta) else "? left"))

    def _emit(self, what: str, counted: bool = False) -> None:
        line = f"[{self.finished}/{self.total}] {what} | {self._status_text()}"
        if self._live is not None:
            self._live.console.print(line, markup=False, highlight=False)
            self._live.refresh()
        else:
            self._write(line)

    def _write(self, line: str) -> None:
        if self._live is not None:
            self._live.console.print(line, markup=False, highlight=False)
            return
        self.stream.write(line + "\n")
        self.stream.flush()

    def _start_live(self) -> None:
        from rich.console import Console
        from rich.live import Live

        console = Console(file=self.stream, force_terminal=True)
        self._live = Live(get_renderable=self._render, console=console, refresh_per_second=2,
                          transient=True, redirect_stdout=False, redirect_stderr=False)
        self._live.start()

    def _render(self):
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        # called from rich's refresh thread: no lock here (the event methods hold ours while they
        # print through rich, which takes rich's lock - taking ours here could deadlock)
        c = self.counts()
        grid = Table.grid(padding=(0, 1))
        grid.add_row(f"[bold]search[/] {c['done']}/{c['total']}",
                     ProgressBar(total=max(self.total, 1), completed=min(c["done"], self.total), width=30),
                     self._status_text())
        return grid


class LineStream:
    """A text stream that hands each complete line to `printer` (print, or a test's collector)."""

    def __init__(self, printer):
        self.printer, self.buf = printer, ""

    def write(self, text: str) -> int:
        self.buf += text
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            self.printer(line, flush=True)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return self.printer is print and sys.stdout.isatty()


def _step(result: Mapping[str, Any]) -> int:
    """The epoch of a result (Tune's training_iteration when it has no 'epochs')."""
    for k in ("epochs", "training_iteration"):
        if math.isfinite(finite_float(result.get(k))):
            return int(finite_float(result[k]))
    return 0


__all__ = ["LineStream", "SearchMonitor", "latency_of"]
