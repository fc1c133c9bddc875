"""Giving back the resident pages of weights read from a memory-mapped checkpoint once a pass is done with them.

transformers maps a safetensors checkpoint into memory and its tensors point into that mapping, so every page a pass
reads stays in the process's resident set to the end, although the kernel's page cache holds the same page anyway.
A reduction that goes layer by layer would otherwise end with the whole checkpoint resident beside its own working
memory. ``release(tensors)`` drops this process's mapping of those pages (``madvise(MADV_DONTNEED)``) only where that
loses nothing: pages that ``/proc/self/pagemap`` shows present and still backed by the file (or by shared memory,
which keeps them too). A page written in place (a copy-on-write page: a merged adapter, a refitted projection),
anonymous memory and swapped pages are never touched. A later read maps the page again from the page cache (a minor
fault, no disk read). Reading pagemap is the whole test: no parse of /proc/self/maps, so a call on a small model's
weights costs microseconds.

Linux only. Elsewhere, or where /proc/self/pagemap or madvise is unavailable, it does nothing and says so by
returning 0. Call it between passes, not while another thread writes the same weights.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported by the save path too, which must not pull in numpy or torch
    import numpy as np
    import torch

PAGE = mmap.PAGESIZE
_PRESENT, _FILE_PAGE = 1 << 63, 1 << 61  # /proc/self/pagemap entry bits
_MADV_DONTNEED = 4


def release(tensors: Iterable[torch.Tensor]) -> int:
    """Drop the resident pages of ``tensors`` (CPU tensors; others are skipped) that the file they were mapped from
    still backs. Returns the bytes given back (0 where nothing could be, e.g. off Linux)."""
    if not sys.platform.startswith("linux"):
        return 0
    ranges = _merged(sorted({_extent(t) for t in tensors if t.device.type == "cpu"} - {None}))
    if not ranges:
        return 0
    try:
        with open("/proc/self/pagemap", "rb") as pagemap:
            return sum(_release_range(_libc(), pagemap, start, end) for start, end in ranges)
    except OSError:
        return 0


@functools.cache
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _extent(t: torch.Tensor) -> tuple[int, int] | None:
    """The bytes [start, end) that ``t``'s elements span (not its whole storage, which a view may share)."""
    if not t.numel() or not t.data_ptr():
        return None
    last = sum((n - 1) * stride for n, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted ranges with those that overlap or touch joined (a layer's weights lie side by side in the file)."""
    out: list[list[int]] = []
    for start, end in ranges:
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def _release_range(libc, pagemap, start: int, end: int) -> int:
    """Drop the pages of [start, end) that pagemap shows present and file-backed; the bytes dropped. Anonymous
    memory (the heap, a weight's copy-on-write page) is never dropped: that would zero it."""
    import numpy as np

    a, b = start // PAGE * PAGE, -(-end // PAGE) * PAGE  # whole pages
    pagemap.seek(a // PAGE * 8)
    data = pagemap.read((b - a) // PAGE * 8)  # a short read (some sandboxes) covers fewer pages
    entries = np.frombuffer(data[: len(data) // 8 * 8], dtype="<u8")
    droppable = ((entries & np.uint64(_FILE_PAGE)) != 0) & ((entries & np.uint64(_PRESENT)) != 0)
    freed = 0
    for first, last in _runs(droppable):
        length = (last - first) * PAGE
        if libc.madvise(ctypes.c_void_p(a + first * PAGE), ctypes.c_size_t(length), _MADV_DONTNEED) == 0:
            freed += length
    return freed


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[first, last) index ranges where ``mask`` is True."""
    import numpy as np

    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def trim() -> bool:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``): a pass's freed batch tensors
    otherwise stay resident in a fragmented heap. False where the C library has no such call."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        malloc_trim = _libc().malloc_trim
    except (OSError, AttributeError):  # musl
        return False
    malloc_trim(0)
    return True
