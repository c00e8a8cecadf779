"""Tune's trial events forwarded to the Ray-free `SearchMonitor` (live progress, TensorBoard)."""

from __future__ import annotations

import sys

from ray import tune

from nas.messages import last_line
from nas.monitor import SearchMonitor
from nas.rundir import Experiment


class _LineStream:
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


class MonitorCallback(tune.Callback):
    """Forwards Tune's trial events to the Ray-free SearchMonitor (live progress, TensorBoard).

    The monitor is built lazily: Tune pickles its callbacks, and the monitor holds locks and writers.
    """

    def __init__(self, exp: Experiment, printer=print):
        self.exp, self.printer, self._monitor = exp, printer, None
        self._noted: set[str] = set()  # trials whose note was printed

    @property
    def monitor(self):
        if self._monitor is None:
            c = self.exp.cfg
            stream = sys.stdout if self.printer is print else _LineStream(self.printer)
            self._monitor = SearchMonitor(self.exp.run_dir, self.exp.space, c.num_trials, stream=stream,
                                          latency_profile=(c.objective.profiles or ("host",))[0])
        return self._monitor

    def __getstate__(self):
        return {**self.__dict__, "_monitor": None, "printer": print}

    def setup(self, **info):
        self.monitor

    def on_trial_start(self, iteration, trials, trial, **info):
        self.monitor.trial_started(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.monitor.trial_result(trial.trial_id, result)
        if result.get("note") and trial.trial_id not in self._noted:  # something the user must hear of, once a trial
            self._noted.add(trial.trial_id)
            self.printer(f"trial {trial.trial_id} ({result.get('key', '')}): {result['note']}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.monitor.trial_completed(trial.trial_id, trial.last_result or {})

    def on_trial_error(self, iteration, trials, trial, **info):
        err = trial.get_error()
        self.monitor.trial_failed(trial.trial_id, last_line(str(err)) if err else "error")

    def on_experiment_end(self, trials, **info):
        self.monitor.close()

    def close(self) -> None:
        if self._monitor is not None:
            self._monitor.close()
