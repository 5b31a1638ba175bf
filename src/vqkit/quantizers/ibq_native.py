"""IBQ's per-row elementwise work as a small C kernel (``ibq_kernels.c``), built with the
machine's C compiler on first use and called through ``ctypes``; the eager PyTorch
passes of :mod:`vqkit.quantizers.softmax_entropy` remain the fallback.

Why a hand-written kernel: at N = 2048, K = 2^14 the eager chain of a tile's
elementwise passes (centring, two clamped ``exp2``, the row sums, the gradient's
products) took about 90 of the fused layer's 440 ms, and Inductor's fused loops of the
same formulas were no faster (they recompute the exponentials in each loop: compute
bound). The kernel reads each row once, evaluates each softmax once into a row buffer
that stays in cache, and writes the result once: inside the layer about 13 ms forward
(with the batch marginal's share) and 35-45 ms backward for those 2048 x 16384 logits,
against about 30 and 65 ms for the eager passes (docs/results.md).

Built once per process (about 0.3 s: ``cc -O3 -march=native``, no ``-ffast-math``, no
FMA contraction, so that vector and scalar code give the same bits) into a temporary
directory, loaded and unlinked: nothing is cached on disk, nothing is built at install.
Where there is no compiler or the build fails, a warning says so once and the eager
passes run; ``VQKIT_NATIVE=0`` switches the kernel off. CPU float32 only; not inside a
``torch.compile`` trace or a dispatch mode (the tensors there hold no data).
"""

from __future__ import annotations

import ctypes
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

__all__ = ["ENV", "backward_rows", "forward_rows", "usable"]

ENV = "VQKIT_NATIVE"
SOURCE = Path(__file__).with_name("ibq_kernels.c")
FLAGS = (
    "-O3 -march=native -fno-math-errno -fno-trapping-math -ffp-contract=off -fopenmp-simd "
    "-shared -fPIC"
)
_state: dict[str, object] = {}  # "lib" once built, "error" once failed
_lock = threading.Lock()
_pool: dict[tuple[int, int], ThreadPoolExecutor] = {}  # by worker count and process
_F32P = ctypes.POINTER(ctypes.c_float)


def _compiler() -> list[str] | None:
    cc = os.environ.get("CC")
    if cc:
        return shlex.split(cc)
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return [found] if found else None


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (cc, gcc or clang on PATH, or $CC)")
    with tempfile.TemporaryDirectory(prefix="vqkit-ibq-") as tmp:
        lib = os.path.join(tmp, "ibq_kernels.so")
        cmd = [*cc, *shlex.split(FLAGS), "-o", lib, str(SOURCE)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if res.returncode != 0:
            first = (res.stderr.strip().splitlines() or ["(no output)"])[0]
            raise RuntimeError(f"{' '.join(cc)} failed (exit {res.returncode}): {first}")
        handle = ctypes.CDLL(lib)  # loaded: the file may go with the directory
    i64, f32, i32 = ctypes.c_int64, ctypes.c_float, ctypes.c_int
    p = _F32P
    handle.ibq_forward.argtypes = [p, p, p, i64, i64, f32, f32, p, p, p, p]
    handle.ibq_forward.restype = None
    handle.ibq_backward.argtypes = [p, p, p, i64, i64, f32, f32, i32, p, p, p, p, p, p, p, p, p]
    handle.ibq_backward.restype = None
    return handle


def _lib() -> ctypes.CDLL | None:
    if "lib" in _state or "error" in _state:
        return _state.get("lib")  # type: ignore[return-value]
    with _lock:
        if "lib" not in _state and "error" not in _state:
            try:
                _state["lib"] = _build()
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                _state["error"] = f"{type(exc).__name__}: {exc}"
                warnings.warn(
                    "vqkit: IBQ's C kernel could not be built, so its tiles run as eager "
                    f"PyTorch passes (slower; set {ENV}=0 to silence): {_state['error']}",
                    RuntimeWarning,
                    stacklevel=4,
                )
    return _state.get("lib")  # type: ignore[return-value]


def usable(x: torch.Tensor) -> bool:
    """Whether the kernel serves tiles of ``x``'s device and dtype here (builds it on
    the first call that could use it)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or os.environ.get(ENV, "1") == "0":
        return False
    if torch.compiler.is_compiling() or is_in_torch_dispatch_mode():
        return False
    return _lib() is not None


def _ptr(t: torch.Tensor | None):  # type: ignore[no-untyped-def]
    if t is None:
        return None
    assert t.is_contiguous() and t.dtype == torch.float32 and t.device.type == "cpu"
    return ctypes.cast(t.data_ptr(), _F32P)


def _row_chunks(rows: int) -> list[tuple[int, int]]:
    """Rows split over torch's intra-op threads (``ctypes`` releases the GIL)."""
    parts = max(1, min(torch.get_num_threads(), rows))
    step = -(-rows // parts)
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


def _run(jobs: list) -> None:  # type: ignore[type-arg]
    if len(jobs) == 1:
        jobs[0]()
        return
    n, pid = len(jobs), os.getpid()
    if (n, pid) not in _pool:  # a forked child has none of its parent's pool threads
        _pool[(n, pid)] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="vqkit-ibq")
    for f in [_pool[(n, pid)].submit(job) for job in jobs]:
        f.result()


def forward_rows(
    s: torch.Tensor,
    m: torch.Tensor,
    w: torch.Tensor,
    inv_t: float,
    floor: float,
    marg: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, abar)`` of raw logits ``s`` (rows, K) with row maxima ``m`` and row weights
    ``w`` (exponents clamped at ``floor``, -126 or above); adds the rows' share ``sum_n
    (w_n / z_n) 2^a2_n`` to ``marg`` (K,)."""
    lib = _lib()
    assert lib is not None and floor >= -126.0
    rows, k = s.shape
    z, abar = s.new_empty(rows), s.new_empty(rows)
    chunks = _row_chunks(rows)
    parts = s.new_zeros(len(chunks), k)  # one marginal per thread, summed below

    def job(i: int, r0: int, r1: int):  # type: ignore[no-untyped-def]
        ubuf = s.new_empty(k)  # 2^a2 of one row at a time
        return lambda: lib.ibq_forward(
            _ptr(s[r0:r1]), _ptr(m[r0:r1]), _ptr(w[r0:r1]), r1 - r0, k, inv_t, floor,
            _ptr(z[r0:r1]), _ptr(abar[r0:r1]), _ptr(parts[i]), _ptr(ubuf),
        )  # fmt: skip

    _run([job(i, a, b) for i, (a, b) in enumerate(chunks)])
    marg += parts.sum(0) if len(chunks) > 1 else parts[0]
    return z, abar


def backward_rows(
    s: torch.Tensor,
    gl: torch.Tensor | None,
    m: torch.Tensor,
    inv_t: float,
    floor: float,
    ent: tuple[torch.Tensor, ...] | None,
    out: torch.Tensor,
) -> torch.Tensor:
    """dL/ds of raw logits ``s`` (rows, K) into ``out``, exponents clamped at ``floor``:
    the lookup's part from ``gl = g E^T`` (None: none), the entropy's from ``ent =
    (log_p (K,), top, a_row, b_row, abar, z2)`` (rows each; None: none)."""
    lib = _lib()
    assert lib is not None and floor >= -126.0
    rows, k = s.shape
    log_p, top, a_r, b_r, abar, z2 = ent if ent is not None else (None,) * 6

    def job(r0: int, r1: int):  # type: ignore[no-untyped-def]
        bufs = s.new_empty(2, k)  # p1 and p of one row at a time

        def sl(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[r0:r1]

        return lambda: lib.ibq_backward(
            _ptr(s[r0:r1]), _ptr(sl(gl)), _ptr(m[r0:r1]), r1 - r0, k, inv_t, floor,
            int(ent is not None), _ptr(log_p), _ptr(sl(top)), _ptr(sl(a_r)), _ptr(sl(b_r)),
            _ptr(sl(abar)), _ptr(sl(z2)), _ptr(out[r0:r1]), _ptr(bufs[0]), _ptr(bufs[1]),
        )  # fmt: skip

    _run([job(a, b) for a, b in _row_chunks(rows)])
    return out
