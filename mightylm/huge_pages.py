"""Fewer page faults in CPU training: 2 MiB pages for PyTorch's large tensors, and freed memory kept for reuse.

A training step frees and allocates the same large tensors every step (activations, their gradients, the head's
gradient). By default each lands in fresh pages that the kernel maps and zero-fills 4 KiB at a time on first
touch: measured on SmolLM2-135M, 4 x 256 tokens, float32, 2 threads (an AVX2 AMD EPYC), ~200k minor page faults
and 1.2-1.6 s of system time per step of ~7-9 s. With PyTorch's transparent-huge-page allocation
(THP_MEM_ALLOC_ENABLE: tensors of 2 MiB and more aligned and advised as huge pages) and glibc told to keep freed
memory (mallopt: no trimming), ~9k faults and 0.7-1.0 s of system time.

glibc serves an allocation above its mmap threshold (32 MiB at most) with a mapping of its own and unmaps it when
freed, so such tensors (the loss's chunks, a 49,152-token embedding's 113 MB gradient) came back as fresh pages
every step: in a full step of SmolLM2-135M still ~1,100 faults and 1.2-1.6 s of system time, and in a VM whose freed
memory goes back to the host each fault cost ~1 ms. With mmap turned off (M_MMAP_MAX 0) glibc serves them from its
heap and keeps them too: after a few steps none, a full step 6.6 -> 5.8 s at the same peak resident memory
(5.1 GB; 2026-12-05).

PyTorch reads THP_MEM_ALLOC_ENABLE once, at its first allocation, so `for_training` must run before torch is
imported: `mighty pretrain|finetune|distill` call it first thing. Not for decoding or serving, whose resident
memory is measured and would round up to huge pages. THP_MEM_ALLOC_ENABLE=0 in the environment turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def for_training() -> bool:
    """Ask for huge pages and kept memory (see the module's docstring); True where both took effect: torch not yet
    imported, not turned off, and a glibc to take the mallopt calls."""
    if os.environ.get("THP_MEM_ALLOC_ENABLE") == "0" or "torch" in sys.modules:
        return False
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (musl, macOS): huge pages alone
        return False
