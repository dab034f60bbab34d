"""The process's malloc tuning (deploy/allocator.py): a fixed mmap threshold, so that blocks the
size of a Kafka message of 500 events get a mapping of their own (returned when freed)."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from deploy import allocator
from deploy.settings import AggregatorSettings

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")


# Run in a process of its own: once set, glibc's threshold stays fixed for the process's life.
_PROBE = """
import ctypes, sys
from deploy import allocator

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
if sys.argv[1] != "0":
    assert allocator.set_mmap_threshold(int(sys.argv[1]))
# a large buffer freed (a batch's), then a smaller one: is the smaller one given a mapping of its own?
libc.free(libc.malloc(24 << 20))
before = libc.mallinfo2().hblks
block = libc.malloc(16 << 20)
print(libc.mallinfo2().hblks == before + 1)
libc.free(block)
"""


def _mapped_after_a_larger_block_was_freed(threshold: int) -> bool:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(threshold)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    return out.stdout.strip() == "True"


@glibc
def test_a_fixed_threshold_keeps_blocks_below_a_freed_buffer_out_of_the_heap() -> None:
    # glibc's own behaviour: freeing a mapped 24 MiB block raises its threshold to 24 MiB, and the
    # 16 MiB block after it comes from the heap, where it stays resident once freed
    assert not _mapped_after_a_larger_block_was_freed(0)
    # fixed at 64 KiB: the 16 MiB block gets a mapping of its own, returned to the system when freed
    assert _mapped_after_a_larger_block_was_freed(64 << 10)


def test_zero_leaves_the_allocator_alone() -> None:
    assert allocator.set_mmap_threshold(0) is False


def test_the_setting_is_bounded_by_what_glibc_takes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert AggregatorSettings().malloc_mmap_threshold == 64 << 10
    monkeypatch.setenv("METERING_MALLOC_MMAP_THRESHOLD", str(1 << 20))
    assert AggregatorSettings().malloc_mmap_threshold == 1 << 20
    monkeypatch.setenv("METERING_MALLOC_MMAP_THRESHOLD", str(64 << 20))
    with pytest.raises(ValidationError):
        AggregatorSettings()
