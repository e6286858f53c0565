"""t5kit's own fp32 CPU kernel for the decode step's projections (`cpu_linear.c`, issue 19), built
on first use with the machine's C compiler and loaded with ctypes; the `t5kit` weight layout of
inference/cpu.py. The weight is held as 32-row panels (`to_panels`); `linear` is y = x W^T.

The library is compiled for the kernels PyTorch itself runs (`torch.backends.cpu.
get_cpu_capability()`: AVX-512 or AVX2 + FMA, so ATEN_CPU_CAPABILITY=avx2 builds the AVX2 one) and
kept in the cache folder under a name that holds the source's hash and that ISA; a build is written
to a temporary file and renamed. Without an x86 CPU of either class, a C compiler ($CC, cc, gcc) or
a successful build the layout is unavailable (`available()` is False, with the reason in
`unavailable_reason()`) and layouts are chosen among oneDNN's and plain, as before.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess

import torch
from torch import Tensor

from ..atomic import atomic_path

PANEL = 32  # output rows per panel, fixed by cpu_linear.c
_SOURCE = os.path.join(os.path.dirname(__file__), "cpu_linear.c")
_ISA_FLAGS = {"AVX512": ["-mavx512f", "-mavx2", "-mfma"], "AVX2": ["-mavx2", "-mfma"]}


def cache_dir() -> str:
    """$T5KIT_CACHE_DIR, else $XDG_CACHE_HOME/t5kit, else ~/.cache/t5kit."""
    return os.environ.get("T5KIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "t5kit")


@functools.cache
def version() -> str:
    """The kernel's version: a hash of its source."""
    with open(_SOURCE, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


@functools.cache
def _build() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded library, "") or (None, why it is unavailable); once per process."""
    isa = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() not in ("x86_64", "amd64") or isa not in _ISA_FLAGS:
        return None, f"needs an x86 CPU with AVX2 or AVX-512 kernels (PyTorch's CPU capability: {isa})"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None, "no C compiler ($CC, cc or gcc) to build it"
    path = os.path.join(cache_dir(), "kernels", f"cpu_linear-{version()}-{isa.lower()}.so")
    if not os.path.exists(path):
        try:
            with atomic_path(path) as tmp:
                subprocess.run([cc, "-O3", "-fopenmp", "-shared", "-fPIC", *_ISA_FLAGS[isa], _SOURCE, "-o", tmp],
                               check=True, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", None) or str(e)
            return None, f"building {_SOURCE} with {cc} failed: {detail.strip()[-500:]}"
    lib = ctypes.CDLL(path)
    lib.t5kit_linear.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3 + [ctypes.c_int]
    lib.t5kit_linear.restype = ctypes.c_int
    return lib, ""


def available() -> bool:
    return _build()[0] is not None


def unavailable_reason() -> str:
    return _build()[1]


def to_panels(weight: Tensor) -> Tensor:
    """(N, K) fp32 -> (ceil(N / 32), K, 32): panel b, row k = weight[32b : 32b + 32, k], zero-padded."""
    n, k = weight.shape
    padded = torch.cat([weight, weight.new_zeros(-n % PANEL, k)])
    return padded.view(-1, PANEL, k).transpose(1, 2).contiguous()


def linear(x: Tensor, panels: Tensor, out_features: int) -> Tensor:
    """x (..., K) fp32 @ W^T for W in panels (`to_panels`) -> (..., out_features)."""
    x = x.contiguous()
    k = panels.shape[1]
    y = x.new_empty(*x.shape[:-1], out_features)
    rows = x.numel() // k
    if _build()[0].t5kit_linear(x.data_ptr(), panels.data_ptr(), y.data_ptr(), rows, out_features, k,
                                torch.get_num_threads()):
        raise MemoryError(f"t5kit's CPU kernel: no memory to regroup {rows} x {k} fp32 inputs")
    return y
