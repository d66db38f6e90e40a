"""Small shared helpers: stage timing, cache keys and folders, atomic file writes."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from typing import Any, Iterator, Mapping


def resident_bytes() -> int:
    """The process's resident set size now (Linux ``/proc/self/statm``; elsewhere its peak so far)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library is not glibc (macOS, musl)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Hand the heap pages freed tensors left behind back to the system (glibc ``malloc_trim(0)``); True where it ran.

    Tensors below glibc's mmap threshold (up to 32 MB once larger blocks have been freed) live on the heap, and their
    pages stay resident after they are freed: after the Book-sized surrogate's training 1.15 GB of the process's
    5.51 GB was such free heap, and every later stage's peak sat on top of it. Called as every stage and every
    surrogate training epoch ends. Frees nothing that is in use; changes no result."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class StageTimer:
    """Wall time and peak resident memory per stage, logged as each stage ends: ``with timer("training"): ...``;
    ``timer.seconds``, ``timer.peak_gb``.

    ``seconds`` holds each stage's own time: a stage run inside another (the surrogate, trained inside the first
    signal that needs it) is not counted again in the outer one, so the stages add up to the run's time.

    The peak is sampled (every ``sample_seconds``, and at the stage's start and end) by a thread that runs only
    while the stage does: the kernel's own high-water mark cannot be reset per stage without also resetting the
    whole process's (what ``/usr/bin/time`` reports)."""

    def __init__(self, sample_seconds: float = 0.05) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_gb: dict[str, float] = {}
        self.sample_seconds = sample_seconds
        self._inner: list[float] = []  # per open stage, outermost first: the seconds of the stages run inside it

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        import threading
        from logging import getLogger

        peak = [resident_bytes()]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(self.sample_seconds):
                peak[0] = max(peak[0], resident_bytes())

        sampler = threading.Thread(target=sample, name=f"peak-rss-{stage}", daemon=True)
        sampler.start()
        self._inner.append(0.0)
        start = time.perf_counter()
        try:
            yield
        finally:
            done.set()
            sampler.join()
            total, inner = time.perf_counter() - start, self._inner.pop()
            if self._inner:
                self._inner[-1] += total
        self.seconds[stage] = round(total - inner, 2)
        self.peak_gb[stage] = round(max(peak[0], resident_bytes()) / 2**30, 3)
        release_freed_memory()  # the next stage's peak starts from what is in use, not from this stage's free heap
        getLogger().info(f"[Time] {stage}: {self.seconds[stage]:.1f} s, peak RSS {self.peak_gb[stage]:.2f} GB"
                         + (f" (besides {inner:.1f} s in the stages inside it)" if inner else ""))


@contextlib.contextmanager
def rng_untouched() -> Iterator[None]:
    """Run a cache's build with the global RNGs RecBole's ``init_seed`` seeds (torch's, CUDA's current device once
    CUDA is in use, numpy's and Python's) restored after it: what the caller draws next is the same whether the entry
    was built in this process or read from the cache."""
    import random

    import numpy as np
    import torch

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def fsync_folder(folder: str) -> None:
    """Flush a folder's entries (a rename into it) to disk, where the file system allows."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def staged_folder(target: str) -> Iterator[str]:
    """A fresh temporary sibling of ``target`` to write a whole folder into; it replaces ``target`` (by rename) only
    when the block ends without an error, so readers see the old folder or the new one, never a half-written one,
    and a failure leaves a previous ``target`` as it was."""
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(target)}.staging-")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp creates 0700; give the folder a plain mkdir's permissions
        yield staging
        fsync_folder(staging)
        _swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_in(staging: str, target: str) -> None:
    """Put the finished folder ``staging`` at ``target``; a previous ``target`` is kept until the new one is in."""
    parent = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(target):
        os.rename(staging, target)
    else:
        # An empty placeholder reserves a unique name; renaming a folder onto an empty folder replaces it.
        old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(target)}.old-")
        try:
            os.rename(target, old)
        except BaseException:
            os.rmdir(old)
            raise
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    fsync_folder(parent)


def stable_key(payload: Mapping[str, Any]) -> str:
    """Short SHA-256 of a JSON-able mapping (keys sorted): the name of a cached result."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def folder_digest(folder: str, wanted) -> str:
    """SHA-256 of the names and bytes of the files of ``folder`` whose name ``wanted(name)`` accepts, by name."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if wanted(name):
            digest.update(name.encode())
            with open(os.path.join(folder, name), "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def dataset_fingerprint(config: Mapping[str, Any]) -> str:
    """SHA-256 of the dataset's atomic files (``<data_path>/<dataset>.*``): part of every cache key."""
    return folder_digest(config["data_path"], lambda name: name.startswith(config["dataset"] + "."))


def cache_dir(config: Mapping[str, Any]) -> str:
    """``<output_dir>/<dataset>/cache``: trained surrogates and scores, each file named by its key."""
    return os.path.join(config["output_dir"], config["dataset"], "cache")


def file_checksum(path: str) -> str:
    """``"<sha256> <size>"`` of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return f"{digest.hexdigest()} {os.path.getsize(path)}"


def cache_record(path: str, checksum: str) -> str:
    """A cache file's record: ``"<sha256> <size> <file name>"``. The name carries the entry's key (every cache
    file is named by a hash of the settings and data it came from), so the record proves which key the bytes
    belong to, not only that they are intact: an entry copied or renamed to another key's name is refused."""
    return f"{checksum} {os.path.basename(path)}"


def cache_entry_ok(path: str) -> bool:
    """Whether a cache file written with ``atomic_write(..., checksum=True)`` is there and intact.

    A file whose record (``<path>.sha256``: SHA-256, size and the name it was written under) is missing or differs
    (truncated by a full disk, a crash outside this code, a bad copy, another key's entry under this name) is
    logged as a warning naming it, deleted with its record, and reported absent, so the caller recomputes it.
    """
    record = path + ".sha256"
    if not os.path.isfile(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(record)
        return False
    try:
        with open(record, encoding="utf-8") as handle:
            expected = handle.read().strip()
    except FileNotFoundError:
        expected = None
    if expected is not None and expected == cache_record(path, file_checksum(path)):
        return True
    from logging import getLogger

    if expected is None:
        why = "has no checksum record"
    elif expected.split(" ")[-1] != os.path.basename(path):
        why = (f"was recorded as {expected.split(' ')[-1]!r}, not under its own name: another key's entry (a cache "
               "entry is named by its key)")
    else:
        why = "does not match its recorded checksum (truncated or changed)"
    getLogger().warning(f"cache file {path} {why}: discarded, it will be recomputed")
    for stale in (path, record):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)
    return False


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", checksum: bool = False, **kwargs) -> Iterator:
    """Open a temporary file beside ``path``; move it onto ``path`` only if the block succeeds.

    Readers never see a half-written file and a failed write never clobbers an existing one. With ``checksum``
    (cache files), the file's SHA-256 and size are recorded in ``<path>.sha256`` for :func:`cache_entry_ok`.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600; give the file the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if checksum:
            record = cache_record(path, file_checksum(tmp))
        os.replace(tmp, path)
        if checksum:
            with atomic_write(path + ".sha256", encoding="utf-8") as handle:
                handle.write(record + "\n")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
