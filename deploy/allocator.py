"""The process's C allocator (glibc's malloc), tuned for the aggregator's batches.

glibc serves a block above its *mmap threshold* (when its heap has no room for it) with a mapping
of its own, returned to the system when freed, and a smaller one from its heaps, which keep freed
memory for reuse. The threshold starts at 128 KiB but is dynamic: each time a mapped block is
freed, it rises to that block's size (up to 32 MiB), and the size of free memory the heap keeps at
its top before giving it back rises to twice that. The aggregator frees blocks of several MiB
every batch (Kafka fetch responses, a batch's buffers), so after the first batches every block
below them (Kafka messages of 500 events are ~135 KiB) comes from the heaps, where freed batches
leave resident memory that is not returned and holes the next ones do not fill exactly. A fixed
threshold (``mallopt(M_MMAP_THRESHOLD)``, which also turns the dynamic adjustment off) gives such
blocks mappings that go back to the system once the batch is done. Measured (docs/performance.md,
"The C allocator"): RSS at the end of the pipeline benchmark 692–736 against 818–885 MiB from the
same start; CPU per event the same within the machine's noise.

Only glibc has ``mallopt``; elsewhere (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MAX_MMAP_THRESHOLD = 32 << 20  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)


def set_mmap_threshold(nbytes: int) -> bool:
    """Blocks of ``nbytes`` and more each get a mapping of their own, returned when freed; 0 leaves
    the allocator as it is. True when applied (setting it again is harmless)."""
    if nbytes <= 0:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols: libc's
    except (OSError, AttributeError):
        log.debug("no mallopt in this C library: the allocator keeps its defaults")
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, int(nbytes)) != 1:
        log.warning("malloc refused an mmap threshold of %d bytes: the allocator keeps its defaults", nbytes)
        return False
    return True
