"""What a process's malloc does with large buffers: imports nothing heavy, so the tests that start
processes just to call it (test_cpu_tuning) stay quick."""

from __future__ import annotations


def big_buffer_faults() -> int:
    """Page faults of 50 rounds of a 4 MiB buffer allocated, written and freed, in this process."""
    import ctypes
    import resource

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):
        p = libc.malloc(4 << 20)
        ctypes.memset(p, 1, 4 << 20)
        libc.free(p)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
