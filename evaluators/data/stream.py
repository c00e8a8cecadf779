"""Streaming a training split from disk into the training step, for data larger than memory.

Why Grain: it is the JAX ecosystem's own loader (Google, Apache-2.0, pure Python wheels for
3.10-3.13), built for exactly this: deterministic global shuffling by index without holding the
data, per-epoch reshuffling, multi-process decoding with shared-memory prefetch, and it reads
any random-access source (our folder records, TFDS's ArrayRecord data sources) with neither
TensorFlow nor PyTorch in the process. tf.data would bring TensorFlow back into the training path;
PyTorch's DataLoader would add a second framework (and its threads) to the process.

The pipeline: training rows -> shuffle (seeded, new order every epoch) -> decode + normalise in
worker processes (skipping unreadable images only if the spec allows) -> fixed-shape batches ->
prefetch. The training loop takes `chunk` batches at a time and runs them as one compiled scan,
the same program the in-memory path runs per epoch; augmentation happens in that program.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from evaluators.data.records import ReadNormalised, readable
from evaluators.data.source import Records
from search_spaces.errors import NasError

# Worker processes for decoding. Grain decodes with a pool of threads in this process anyway
# (Pillow releases the GIL), and its workers are spawned processes that re-import the parent's main
# module: on 2 cores (benchmarks/datasets.py, a loaded machine) in-process decoding delivered 432
# images/s, 6x what the training step consumed, with its first batch after 2.9 s, while 2 worker
# processes delivered 275 images/s after 31.8 s. So: processes only where there are cores to spare.
DEFAULT_WORKERS = 0 if (os.cpu_count() or 1) <= 2 else min(4, (os.cpu_count() or 1) - 2)


@dataclass(frozen=True, eq=False)
class Stream:
    """A training split left on disk: its records, the rows that are training rows, and the
    per-channel statistics (estimated from a seeded sample) to normalise with."""

    records: Records
    rows: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    workers: int = DEFAULT_WORKERS


class StreamedImages:
    """Stands in for `Dataset.x_train` when the training split is streamed: it has a shape and a
    length, but reading it as an array is a clear error instead of decoding the whole split."""

    def __init__(self, where: str, shape: tuple[int, ...]):
        self.where, self.shape, self.dtype, self.ndim = where, tuple(shape), np.dtype(np.float32), len(shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _refuse(self, *_: Any, **__: Any) -> Any:
        raise NasError(f"{self.where}: the training split is streamed from disk (dataset.streaming); this step "
                       f"needs it in memory: set dataset.streaming: false (or use a smaller dataset)")

    __array__ = __getitem__ = __iter__ = _refuse


def train_batches(stream: Stream, batch_size: int, *, seed: int, epochs: int, first_epoch: int = 1,
                  workers: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(x, y) batches of `batch_size` for epochs `first_epoch`..`epochs`, each epoch a new seeded
    order of the training rows; the loop takes `len(rows) // batch_size` batches per epoch.

    One more epoch than needed is queued so that skipped unreadable images never starve the last
    epoch. Workers are separate processes (`workers` 0: decode in this process).
    """
    try:
        import grain  # optional (the `data` extra)
    except ImportError:
        raise NasError("dataset.streaming needs Grain: pip install 'compact-nas[data]'") from None
    from absl import flags  # Grain's dependency

    if not flags.FLAGS.is_parsed():
        # Grain 0.2.18 reads an absl flag when it starts worker processes in a program that never
        # parsed absl flags (ours: argparse/Ray) and raises UnparsedFlagAccessError (measured here):
        # mark them parsed, so every absl flag keeps its default value.
        flags.FLAGS.mark_as_parsed()
    n = len(stream.rows)
    ds = grain.MapDataset.source(stream.rows).shuffle(seed=int(seed) % (1 << 32)).repeat(epochs + 1)
    if first_epoch > 1:  # resume: the same orders as an uninterrupted run, from `first_epoch` on
        ds = ds[(first_epoch - 1) * n:]
    it = (ds.map(ReadNormalised(stream.records, stream.mean, stream.std)).to_iter_dataset()
          .filter(readable).batch(batch_size, drop_remainder=True))
    w = stream.workers if workers is None else workers
    if w > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=w, per_worker_buffer_size=2))
    return iter(it)
