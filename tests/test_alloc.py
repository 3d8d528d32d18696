"""retain_freed_memory: glibc's mallopt when present, a harmless no-op elsewhere."""
import ctypes
import platform

import numpy as np

from tomtit import alloc


def test_applies_on_glibc_and_memory_still_works():
    expected = platform.libc_ver()[0] == "glibc"
    assert alloc.retain_freed_memory() is expected
    assert alloc.retain_freed_memory() is expected  # idempotent
    # large arrays still allocate, free and reallocate correctly afterwards
    for n in (1 << 16, 1 << 20, 1 << 16):
        a = np.arange(n, dtype=np.float64)
        assert a[-1] == n - 1
        del a


def test_without_mallopt_nothing_happens(monkeypatch):
    def no_libc(name):
        raise OSError("no such library")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert alloc.retain_freed_memory() is False
