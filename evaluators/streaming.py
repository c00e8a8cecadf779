"""The streaming path of `evaluators.train.train`: batches read from disk by Grain are fed to the
same compiled epoch program the in-memory path uses, `chunk` batches per call.

In memory, one call runs a whole epoch over the device-resident split. Streaming, one call runs
`chunk` batches (a divisor of the epoch's steps, about `CHUNK_IMAGES` images) handed over from the
loader, so the program still scans several steps per dispatch while the loader's worker processes
decode the next chunk. Running BatchNorm statistics are folded once per call: the same numbers.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import jax.numpy as jnp
import numpy as np

from evaluators.data.stream import Stream, train_batches
from search_spaces.errors import NasError

CHUNK_IMAGES = 2048


def chunk_steps(steps: int, batch_size: int) -> int:
    """Batches per compiled call: the largest divisor of `steps` with at most ~CHUNK_IMAGES images."""
    cap = max(1, min(steps, CHUNK_IMAGES // batch_size))
    return max(d for d in range(1, cap + 1) if steps % d == 0)


class StreamFeed:
    """The training batches of a run (epochs `first_epoch`..`epochs`), taken one epoch at a time."""

    def __init__(self, stream: Stream, batch_size: int, *, seed: int, epochs: int, first_epoch: int,
                 steps: int, chunk: int):
        self.where = getattr(stream.records, "where", lambda i: "dataset")(int(stream.rows[0]))
        self.batches: Iterator[tuple[np.ndarray, np.ndarray]] = train_batches(
            stream, batch_size, seed=seed, epochs=epochs, first_epoch=first_epoch)
        self.steps, self.chunk = steps, chunk
        self.idx = np.arange(chunk * batch_size, dtype=np.int32).reshape(chunk, batch_size)

    def epoch(self, program: Callable[..., Any], state: Any, hparams: Mapping[str, Any]) -> tuple[Any, Any]:
        """Run one epoch's `steps` batches through `program` (the compiled `train_epoch`); (state, losses)."""
        losses = []
        for _ in range(self.steps // self.chunk):
            try:
                xs, ys = zip(*(next(self.batches) for _ in range(self.chunk)))
            except (StopIteration, RuntimeError):
                raise NasError(f"the training stream ran dry ({self.where} and others): too many unreadable "
                               f"images were skipped (dataset.skip_corrupt)") from None
            state, loss = program(state, {"x": np.concatenate(xs), "y": np.concatenate(ys)}, self.idx, hparams)
            losses.append(loss)
        return state, jnp.concatenate(losses)

    def close(self) -> None:
        close = getattr(self.batches, "close", None)
        if close is not None:
            close()
