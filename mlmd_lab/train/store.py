"""Where the training arrays of a data set live: one fixed-size record per frame, in memory or in a file on disk.

A record holds one frame's padded training arrays (:func:`~mlmd_lab.train.data.frame_record`: symmetry functions,
their pair derivatives, labels). Training gathers the records of each batch on the host and hands them to the
compiled step, so the step's memory is one batch whatever the size of the set, and the set itself can live in a
file (read with ``pread``, not memory-mapped: mapped pages would count as the process's memory once read, while
the page cache that serves the reads is the system's and is given back under pressure).

Why a record per frame rather than one array per field: a batch is then one read per frame, and the same byte
layout serves memory and disk, so the two modes cannot drift apart.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from collections.abc import Mapping
from pathlib import Path

import numpy as np

#: Field offsets within a record are multiples of this many bytes (aligned loads for every dtype).
ALIGN = 64


class FeatureStore:
    """``n_frames`` records of the fields ``{name: (shape, dtype)}`` (shape per frame).

    Args:
        fields: the per-frame arrays a record holds.
        n_frames: records.
        directory: None keeps the records in memory; a folder puts them in a file there (deleted with the store).
    """

    def __init__(self, fields: Mapping[str, tuple[tuple[int, ...], np.dtype]], n_frames: int,
                 directory: str | os.PathLike | None = None) -> None:
        self.fields = {name: (tuple(int(n) for n in shape), np.dtype(dtype)) for name, (shape, dtype) in fields.items()}
        self.n_frames = int(n_frames)
        self.offsets: dict[str, int] = {}
        size = 0
        for name, (shape, dtype) in self.fields.items():
            self.offsets[name] = size
            size += -(-int(np.prod(shape, dtype=np.int64)) * dtype.itemsize // ALIGN) * ALIGN
        self.record_bytes = max(size, ALIGN)
        self.path: Path | None = None
        self._fd: int | None = None
        self._buffer: np.ndarray | None = None
        if directory is None:
            self._buffer = np.zeros((self.n_frames, self.record_bytes), np.uint8)
        else:
            Path(directory).mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="mlmd_features_", suffix=".bin", dir=directory)
            self.path, self._fd = Path(name), fd
            os.ftruncate(fd, self.nbytes)
            self._finalizer = weakref.finalize(self, _remove, fd, name)

    @property
    def on_disk(self) -> bool:
        return self.path is not None

    @property
    def nbytes(self) -> int:
        """Bytes of all records."""
        return self.n_frames * self.record_bytes

    def __repr__(self) -> str:
        where = f"file {self.path}" if self.on_disk else "memory"
        return f"FeatureStore({self.n_frames} frames x {self.record_bytes / 2**20:.2f} MiB in {where})"

    def write(self, row: int, values: Mapping[str, np.ndarray]) -> None:
        """Record ``row`` from one frame's arrays (each cast to its field's dtype; every field must be given)."""
        record = np.zeros(self.record_bytes, np.uint8)
        for name, (shape, dtype) in self.fields.items():
            value = np.asarray(values[name], dtype=dtype, order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
            if value.shape != shape:
                raise ValueError(f"field {name!r} has shape {value.shape}, the store holds {shape}")
            start = self.offsets[name]
            record[start:start + value.nbytes] = value.reshape(-1).view(np.uint8)
        if self._buffer is not None:
            self._buffer[row] = record
        else:
            written = os.pwrite(self._fd, record, int(row) * self.record_bytes)
            if written != self.record_bytes:
                raise OSError(f"short write to {self.path} ({written} of {self.record_bytes} bytes); disk full?")

    def gather(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The records ``rows`` as arrays with a leading batch axis: ``{name: (len(rows), *shape)}``."""
        rows = np.asarray(rows, np.int64)
        if self._buffer is not None:
            raw = self._buffer[rows]
        else:
            raw = np.empty((rows.size, self.record_bytes), np.uint8)
            for k, row in enumerate(rows):
                got = os.preadv(self._fd, [raw[k]], int(row) * self.record_bytes)
                if got != self.record_bytes:
                    raise OSError(f"short read from {self.path} ({got} of {self.record_bytes} bytes)")
        out = {}
        for name, (shape, dtype) in self.fields.items():
            start = self.offsets[name]
            size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            out[name] = raw[:, start:start + size].copy().view(dtype).reshape((rows.size, *shape))
        return out

    def close(self) -> None:
        """Free the records now (the file is deleted)."""
        self._buffer = None
        if self._fd is not None:
            self._finalizer()
            self._fd = None


def _remove(fd: int, name: str) -> None:
    try:
        os.close(fd)
    finally:
        Path(name).unlink(missing_ok=True)
