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

import mmap
import os
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

#: Bytes per ``pwrite`` when a record goes to its file. Why pieces: the kernel gives a large write large page
#: folios, and finding free 2 MB blocks (compaction) made writing the 1.7 GB of the water set's records cost 9-13 s
#: in whole 6 MB records against 1.1 s in 64 KB pieces (same data, same machine, measured with cProfile).
WRITE_PIECE = 1 << 16

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
        self._device: dict | None = None  # memory mode: the fields on the device, once training asks
        if directory is None:
            self._buffer = _small_page_zeros(self.n_frames * self.record_bytes).reshape(self.n_frames,
                                                                                         self.record_bytes)
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
            start, written = int(row) * self.record_bytes, 0
            for offset in range(0, self.record_bytes, WRITE_PIECE):
                written += os.pwrite(self._fd, record[offset:offset + WRITE_PIECE], start + offset)
            if written != self.record_bytes:
                raise OSError(f"short write to {self.path} ({written} of {self.record_bytes} bytes); disk full?")

    def gather(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The records ``rows`` as arrays with a leading batch axis: ``{name: (len(rows), *shape)}``.

        Each byte is copied once: from memory by one slice per record and field, from disk by one ``preadv`` per record
        that scatters the record straight into the fields' arrays (a training step reads a batch per step, so
        copies here are a share of the epoch time)."""
        rows = np.asarray(rows, np.int64)
        out = {name: _empty((rows.size, *shape), dtype) for name, (shape, dtype) in self.fields.items()}
        if self._buffer is not None:
            # A copy per record and field: np.take of the strided (records x field bytes) view first copied the
            # whole view into a contiguous temporary (every record, each call): 11.8 s for the 1.7 GB of the
            # water set's records, against ~1 s this way (measured with cProfile).
            for name in self.fields:
                start = self.offsets[name]
                flat = out[name].reshape(rows.size, -1).view(np.uint8)
                stop = start + flat.shape[1]
                for k, row in enumerate(rows):
                    flat[k] = self._buffer[row, start:stop]
            return out
        pieces, end = [], 0
        for name in self.fields:  # fields in record order, with the alignment gaps read into a scratch buffer
            gap = self.offsets[name] - end
            if gap:
                pieces.append((None, gap))
            size = out[name][0].nbytes if rows.size else 0
            pieces.append((name, size))
            end = self.offsets[name] + size
        tail = self.record_bytes - end
        scratch = np.empty(max([n for key, n in pieces if key is None] + [tail, 1]), np.uint8)
        for k, row in enumerate(rows):
            # k:k+1, not k: a 0-d field's element would be a numpy scalar, a copy that the read would not reach.
            buffers = [scratch[:n] if key is None else out[key][k:k + 1].reshape(-1).view(np.uint8)
                       for key, n in pieces]
            if tail:
                buffers.append(scratch[:tail])
            got = os.preadv(self._fd, [b for b in buffers if len(b)], int(row) * self.record_bytes)
            if got != self.record_bytes:
                raise OSError(f"short read from {self.path} ({got} of {self.record_bytes} bytes)")
        return out

    def device_gather(self, rows: np.ndarray) -> dict:
        """As :meth:`gather`, as JAX arrays. Records in memory are put on the device once, field by field, and a
        batch is taken from them by one compiled call: per-step host gathers and transfers of ~30 small arrays
        made training on small frames (8-atom cells, hundreds of steps per epoch) 4x slower. Records on disk are
        read on the host (:meth:`gather`) and transferred."""
        if self._buffer is None:
            return {k: jax.device_put(v, may_alias=True) for k, v in self.gather(rows).items()}
        if self._device is None:
            every = np.arange(self.n_frames)
            self._device = {k: jax.device_put(v) for k, v in self.gather(every).items()}
        return _take(self._device, jnp.asarray(np.asarray(rows, np.int32)))

    def close(self) -> None:
        """Free the records now (the file is deleted)."""
        self._buffer = None
        self._device = None
        if self._fd is not None:
            self._finalizer()
            self._fd = None


#: Arrays from this many bytes on are allocated by :func:`_small_page_zeros` (numpy's huge-page threshold).
LARGE = 4 << 20


def _empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """``np.empty``, in normal pages from :data:`LARGE` bytes on (see :func:`_small_page_zeros`)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < LARGE:
        return np.empty(shape, dtype)
    return _small_page_zeros(nbytes).view(dtype).reshape(shape)


def _small_page_zeros(nbytes: int) -> np.ndarray:
    """A zeroed uint8 array of ``nbytes`` in its own anonymous mapping, with the kernel's normal pages.

    Why not ``np.zeros``: numpy asks for transparent huge pages on large arrays, and where the kernel gives them
    only on request (the usual ``madvise`` setting) it then compacts memory to find each free 2 MB block when a
    page is first written: filling the 1.7 GB of the water set's records took 16.5 s that way against ~1 s here
    (measured with cProfile on this machine). The mapping is freed with the array."""
    if nbytes == 0 or not hasattr(mmap, "MAP_ANONYMOUS"):  # (no anonymous mappings: Windows)
        return np.zeros(nbytes, np.uint8)
    return np.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), np.uint8)


def _remove(fd: int, name: str) -> None:
    try:
        os.close(fd)
    finally:
        Path(name).unlink(missing_ok=True)


#: Frames of one size bucket have at most this many times the atoms of its smallest frame: records are padded to
#: the bucket's largest frame, so memory stays within this factor of the atoms present (mixed sets of bulk cells,
#: slabs and molecules would otherwise pad every molecule to the largest cell), at one compilation per bucket.
BUCKET_RATIO = 2.0


def size_buckets(sizes: Sequence[int], ratio: float = BUCKET_RATIO) -> list[np.ndarray]:
    """Frame indices grouped by atom count (ascending): a bucket starts at its smallest frame and takes every frame
    up to ``ratio`` times its atoms. Each bucket's indices are in frame order."""
    sizes = np.asarray(sizes, np.int64)
    order = np.argsort(sizes, kind="stable")
    buckets, current, smallest = [], [], None
    for k in order:
        if current and sizes[k] > ratio * smallest:
            buckets.append(np.sort(np.array(current, np.int64)))
            current = []
        if not current:
            smallest = sizes[k]
        current.append(k)
    if current:
        buckets.append(np.sort(np.array(current, np.int64)))
    return buckets


class FeatureSet:
    """The records of a data set in size buckets: one :class:`FeatureStore` per bucket, with its own capacities;
    frames keep one global row number.

    Args:
        stores: one store per bucket.
        buckets: per bucket, the global rows of its frames, in the order of the store's records.
    """

    def __init__(self, stores: Sequence[FeatureStore], buckets: Sequence[np.ndarray]) -> None:
        self.stores = list(stores)
        n = sum(len(b) for b in buckets)
        self.bucket_of = np.full(n, -1, np.int64)
        self.local = np.full(n, -1, np.int64)
        for index, rows in enumerate(buckets):
            self.bucket_of[rows] = index
            self.local[rows] = np.arange(len(rows))

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.stores)

    @property
    def on_disk(self) -> bool:
        return any(s.on_disk for s in self.stores)

    def __repr__(self) -> str:
        return f"FeatureSet({len(self.stores)} size buckets: {self.stores})"

    def split(self, rows: np.ndarray) -> list[np.ndarray]:
        """``rows`` grouped by bucket (one array per bucket, possibly empty), each in the order given."""
        rows = np.asarray(rows, np.int64)
        return [rows[self.bucket_of[rows] == b] for b in range(len(self.stores))]

    def gather(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The records at global ``rows``, which must share one bucket (see :meth:`split`)."""
        store, local = self._locate(rows)
        return store.gather(local)

    def device_gather(self, rows: np.ndarray) -> dict:
        """As :meth:`gather`, as JAX arrays (:meth:`FeatureStore.device_gather`)."""
        store, local = self._locate(rows)
        return store.device_gather(local)

    def _locate(self, rows: np.ndarray) -> tuple[FeatureStore, np.ndarray]:
        rows = np.asarray(rows, np.int64)
        buckets = np.unique(self.bucket_of[rows])
        if buckets.size != 1:
            raise ValueError(f"a batch must come from one size bucket, these rows span {buckets.tolist()}")
        return self.stores[int(buckets[0])], self.local[rows]

    def close(self) -> None:
        for store in self.stores:
            store.close()



@jax.jit
def _take(fields: dict, rows) -> dict:
    """The batch ``rows`` of device-resident fields, in one compiled call (compiled per shapes)."""
    return {k: v[rows] for k, v in fields.items()}
