"""Everything that imports Ray: the Tune driver, searchers, trainable and progress callback.

Ray's API moves between releases, so it stays behind this one package; the rest of the project
(run directories, distillation, export, report) works without importing it.
"""

from nas.tune.driver import run_search

__all__ = ["run_search"]
