"""Giving back the resident pages of weights read from a memory-mapped checkpoint once a pass is done with them.

transformers maps a safetensors checkpoint into memory and its tensors point into that mapping, so every page a pass
reads stays in the process's resident set to the end, although the kernel's page cache holds the same page anyway.
A reduction that goes layer by layer would otherwise end with the whole checkpoint resident beside its own working
memory. ``release(tensors)`` drops this process's mapping of those pages (``madvise(MADV_DONTNEED)``) only where that
loses nothing: pages that ``/proc/self/pagemap`` shows still backed by the file. A page written in place (a
copy-on-write page: a merged adapter, a refitted projection), anonymous memory and swapped pages are never touched. A
later read maps the page again from the page cache (a minor fault, no disk read).

Linux only. Elsewhere, or where /proc/self/pagemap or madvise is unavailable, it does nothing and says so by
returning 0. Call it between passes, not while another thread writes the same weights.
"""

from __future__ import annotations

import bisect
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
    spans = _file_mappings() if ranges else []
    if not spans:
        return 0
    starts = [lo for lo, _ in spans]
    try:
        libc = _libc()
        with open("/proc/self/pagemap", "rb") as pagemap:
            freed = 0
            for start, end in ranges:  # each against the mappings it overlaps (spans are sorted and disjoint)
                j = max(bisect.bisect_right(starts, start) - 1, 0)
                while j < len(spans) and spans[j][0] < end:
                    freed += _release_range(libc, pagemap, start, end, *spans[j])
                    j += 1
            return freed
    except OSError:
        return 0


@functools.cache
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted ranges with those that overlap or touch joined (a layer's weights lie side by side in the file)."""
    out: list[list[int]] = []
    for start, end in ranges:
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def _extent(t: torch.Tensor) -> tuple[int, int] | None:
    """The bytes [start, end) that ``t``'s elements span (not its whole storage, which a view may share)."""
    if not t.numel() or not t.data_ptr():
        return None
    last = sum((n - 1) * stride for n, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of every mapping of a file into this process."""
    spans = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/"):
                    start, end = fields[0].split("-")
                    spans.append((int(start, 16), int(end, 16)))
    except OSError:
        return []
    return sorted(spans)


def _release_range(libc, pagemap, start: int, end: int, lo: int, hi: int) -> int:
    """Drop the droppable pages of [start, end) within the file mapping [lo, hi); the bytes dropped."""
    import numpy as np

    a, b = max(start, lo) // PAGE * PAGE, min(-(-min(end, hi) // PAGE) * PAGE, hi)  # whole pages in the mapping
    if a >= b:
        return 0
    pagemap.seek(a // PAGE * 8)
    data = pagemap.read((b - a) // PAGE * 8)  # a short read (some sandboxes) covers fewer pages
    entries = np.frombuffer(data[: len(data) // 8 * 8], dtype="<u8")
    # resident, and still the file's (not a copy-on-write page)
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
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # musl
        return False
    malloc_trim(0)
    return True
