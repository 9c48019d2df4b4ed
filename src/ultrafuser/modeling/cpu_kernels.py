"""A small C kernel for the CPU decode step of bf16 LoRA specialists on one base: every member's (x·A)·B added into
the base's output in one pass per projection (`fast_llama.add_lora_b32` without its three PyTorch ops).

Why hand-written: the step's 120 low-rank products a step (4 projections x 30 layers for SmolLM2-135M) are tiny
(K = 16) and PyTorch 2.13 has no CPU op that reads x·A from the bf16 product, multiplies by B in fp32 and adds the
result back rounded once: it takes a converting copy, an fp32 `bmm` and two converting copies, each with its own
per-call cost. Multi-LoRA kernels in the field (punica, vLLM's) are CUDA / Triton only. Measured on the 2-core VM
(docs/benchmarks.md, "the LoRA B products as one C kernel"): 2.9 / 2.5 ms less per step than the ops at batch 1 / 4
in one run; LoRA-shared / one model's throughput 0.824-0.852 at batch 1 and 0.637-0.676 at batch 4 over five runs
(0.735-0.778 and 0.582-0.641 before).

How it stays safe and exact:
- it is compiled on first use with the system's C compiler (`$CC`, else cc / gcc / clang) into the user's cache
  (`kernels/` in `$ULTRAFUSER_CACHE`, else ~/.cache/ultrafuser; made 0700); the folder and a cached library are
  used only if this user owns them and nobody else can write them. No compiler, or a failed build: the PyTorch
  ops run (the same values), logged once;
- for every shape a decode step gives it (once per projection shape and batch size), a self-check compares its
  fp32 sums with the PyTorch ops' (`fast_llama.lora_b32_products`, the plan's own B, random x·A): it is used only
  where they are the same bits, and its bf16 result too, so the step's values do not change. The fp32 `bmm` sums
  the rank terms in order, but with fused multiply-adds or without depending on the shape; the check finds which,
  per machine;
- `ULTRAFUSER_CPU_KERNEL=0` turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

static inline float bf2f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

/* round to nearest even, as PyTorch's float -> bfloat16 (NaN -> quiet NaN) */
static inline uint16_t f2bf(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#define JB 256   /* output columns per work item */
#define MB 8     /* rows per pass */

/* ye: the base's bf16 product (rows of rs elements). For chunk i (gn of them) and row m < M: x·A is the w values
   at ye + xoff[i] + m*rs, the output the c values at ye + yoff[i] + m*rs, B the (w, c) fp32 block B + i*w*c.
   out = bf16(out + sum_r x·A[r] * B[r]), the sum in fp32 in the order r = 0, 1, ..., with fused multiply-adds
   if fused, else a rounded product then a rounded add. w <= 64. With sums (gn, M, c) given, the fp32 sums go
   there and ye is left alone (the self-check). */
void lora_b_add(uint16_t *ye, int64_t rs, int64_t gn, int64_t M, int64_t w, int64_t c,
                const int64_t *xoff, const int64_t *yoff, const float *B, int fused, float *sums) {
    int64_t nj = (c + JB - 1) / JB, items = gn * nj;
    #pragma omp parallel for schedule(static)
    for (int64_t it = 0; it < items; it++) {
        int64_t i = it / nj, j0 = (it % nj) * JB;
        int64_t nb = c - j0 < JB ? c - j0 : JB;
        const float *Bi = B + i * w * c + j0;
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            int64_t mm = M - m0 < MB ? M - m0 : MB;
            float xa[MB][64];
            float acc[MB][JB];
            for (int64_t m = 0; m < mm; m++) {
                const uint16_t *xp = ye + xoff[i] + (m0 + m) * rs;
                for (int64_t r = 0; r < w; r++) xa[m][r] = bf2f(xp[r]);
                for (int64_t j = 0; j < nb; j++) acc[m][j] = 0.f;
            }
            for (int64_t r = 0; r < w; r++) {
                const float *b = Bi + r * c;
                for (int64_t m = 0; m < mm; m++) {
                    const float x = xa[m][r];
                    float *a = acc[m];
                    if (fused) for (int64_t j = 0; j < nb; j++) a[j] = fmaf(x, b[j], a[j]);
                    else for (int64_t j = 0; j < nb; j++) a[j] = a[j] + x * b[j];
                }
            }
            for (int64_t m = 0; m < mm; m++) {
                if (sums) {
                    memcpy(sums + (i * M + m0 + m) * c + j0, acc[m], nb * sizeof(float));
                    continue;
                }
                uint16_t *yp = ye + yoff[i] + (m0 + m) * rs + j0;
                for (int64_t j = 0; j < nb; j++) yp[j] = f2bf(bf2f(yp[j]) + acc[m][j]);
            }
        }
    }
}
"""
MAX_W = 64  # the kernel's x·A window (xa[MB][64])

_STATE: dict = {}  # "fn": the loaded function or None; "modes": {shape key: fused flag or None}; "openmp"


def _compiler() -> str | None:
    for c in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def _openmp() -> bool:
    """OpenMP only where PyTorch itself runs on GNU OpenMP (Linux wheels: libgomp.so.1 in this process): the kernel
    then shares its thread pool (the loader reuses the loaded libgomp.so.1) and its thread count
    (torch.set_num_threads). Another OpenMP runtime (e.g. Intel's in conda builds) would mean two pools: serial."""
    if not sys.platform.startswith("linux") or "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return False
    try:
        return "libgomp" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def _cpu_id() -> str:
    """What -march=native depends on: a library built for one CPU is not loaded on another sharing the cache."""
    flags = ""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        pass
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def _trusted(p: Path) -> bool:
    """Only this user's files that nobody else may write (a library is code)."""
    if not hasattr(os, "getuid"):
        return True
    st = p.stat()
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _build(cc: str, omp: bool) -> Path | None:
    from ultrafuser.embedded.base import cache_root

    flags = ["-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC"] + (["-fopenmp"] if omp else [])
    key = hashlib.sha256("\n".join([SOURCE, cc, " ".join(flags), _cpu_id()]).encode()).hexdigest()[:20]
    d = cache_root() / "kernels"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not _trusted(d):  # others could swap the library between the check below and the load
        log.warning("not using the CPU LoRA kernel: %s is not this user's or others can write it", d)
        return None
    out = d / f"lora_b_add-{key}.so"
    if out.exists():
        if _trusted(out):
            return out
        log.warning("not loading %s: it is not this user's or others can write it; rebuilding it", out)
        out.unlink()
    with tempfile.TemporaryDirectory(dir=d) as tmp:
        src, lib = Path(tmp) / "lora_b_add.c", Path(tmp) / "lora_b_add.so"
        src.write_text(SOURCE)
        r = subprocess.run([cc, *flags, "-o", str(lib), str(src), "-lm"], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            log.info("the CPU LoRA kernel did not build with %s %s: %s", cc, " ".join(flags), r.stderr[-500:])
            return None
        lib.chmod(0o700)
        os.replace(lib, out)
    return out


def _load():
    if os.environ.get("ULTRAFUSER_CPU_KERNEL", "1") == "0":
        return None
    cc = _compiler()
    if cc is None:
        log.info("no C compiler (set $CC): the CPU LoRA-shared decode step runs its B products as PyTorch ops")
        return None
    path = None
    for omp in ((True, False) if _openmp() else (False,)):
        try:
            path = _build(cc, omp)
        except (OSError, subprocess.SubprocessError) as e:
            log.info("the CPU LoRA kernel could not be built: %s", e)
            path = None
        if path is not None:
            _STATE["openmp"] = omp
            break
    if path is None:
        return None
    lib = ctypes.CDLL(str(path))
    fn = lib.lora_b_add
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [p, i64, i64, i64, i64, i64, p, p, p, ctypes.c_int, p]
    fn.restype = None
    return fn


def lora_b_kernel():
    """The loaded kernel (a ctypes function) or None; built and loaded once per process."""
    if "fn" not in _STATE:
        try:
            _STATE["fn"] = _load()
        except OSError as e:  # a library that does not load (another libc, ...): the PyTorch ops
            log.info("the CPU LoRA kernel did not load: %s", e)
            _STATE["fn"] = None
        _STATE["modes"] = {}
    return _STATE["fn"]


def reset() -> None:
    """Forget the loaded kernel and the self-checks (tests; a changed $ULTRAFUSER_CPU_KERNEL)."""
    _STATE.clear()


def _offsets(plan: tuple) -> tuple:
    """(xoff, yoff, rs, gn, M, w, c) for `lora_b_add` from a `fast_llama.lora_b32_plan` tuple: where each chunk's
    x·A and output start in ye, ye's row length, the chunk count, the rows per member, the window, the width."""
    xa, src, B, d, d4, (size, stride, col0) = plan[:6]
    G, n, M, c = size
    if isinstance(src, torch.Tensor):  # flat indices (G·n, M, w): each chunk's first x·A element
        xoff = src[:, 0, 0].to(torch.int64).contiguous()
    else:  # a strided view: (view, size, stride, offset)
        st, off = src[2], src[3]
        xoff = torch.tensor([g * st[0] + k * st[1] + off for g in range(G) for k in range(n)], dtype=torch.int64)
    yoff = torch.tensor([g * stride[0] + k * stride[1] + col0 for g in range(G) for k in range(n)],
                        dtype=torch.int64)
    return xoff, yoff, stride[2], G * n, M, B.shape[1], c


def kernel_args(plan: tuple):
    """(xoff, yoff, rs, gn, M, w, c, fused) for `run`, or None where the kernel does not apply: not loaded, an x·A
    window over MAX_W, or no summation that gives the PyTorch ops' fp32 sums for this plan's shape (`_mode`)."""
    if lora_b_kernel() is None:
        return None
    B = plan[2]
    if B.shape[1] > MAX_W or B.dtype != torch.float32 or B.device.type != "cpu" or not B.is_contiguous():
        return None
    args = _offsets(plan)
    fused = _mode(plan, args)
    return None if fused is None else args + (fused,)


def run(ye: torch.Tensor, B: torch.Tensor, args: tuple) -> None:
    """One projection's (x·A)·B added into the bf16, contiguous ye in place; B (gn, w, c) fp32 contiguous."""
    xoff, yoff, rs, gn, M, w, c, fused = args
    _STATE["fn"](ye.data_ptr(), rs, gn, M, w, c, xoff.data_ptr(), yoff.data_ptr(), B.data_ptr(), fused, None)


def products(ye: torch.Tensor, B: torch.Tensor, args: tuple, fused: int) -> torch.Tensor:
    """The kernel's fp32 sums (gn, M, c) without touching ye (`fast_llama.lora_b32_products`' counterpart)."""
    xoff, yoff, rs, gn, M, w, c = args[:7]
    out = torch.empty(gn, M, c)
    _STATE["fn"](ye.data_ptr(), rs, gn, M, w, c, xoff.data_ptr(), yoff.data_ptr(), B.data_ptr(), fused,
                 out.data_ptr())
    return out


def _mode(plan: tuple, args: tuple):
    """Which summation (1: fused multiply-adds, 0: a rounded product then a rounded add) gives the fp32 products
    of the PyTorch ops (`fast_llama.lora_b32_products`) bit for bit for this plan's shape on this machine (the
    ops' order depends on the shape), and with it the ops' bf16 result (`fast_llama.add_lora_b32_ops`): checked
    once per shape on random x·A with the plan's own B. None: neither, so the ops run."""
    from ultrafuser.modeling import fast_llama

    xoff, yoff, rs, gn, M, w, c = args
    B = plan[2]
    key = (gn, M, w, c, rs, isinstance(plan[1], torch.Tensor), tuple(xoff.tolist()), tuple(yoff.tolist()))
    modes = _STATE["modes"]
    if key not in modes:
        g = torch.Generator().manual_seed(1234 + M)
        ye = (torch.randn(plan[5][0][0] * M, rs, generator=g) * 3).to(torch.bfloat16)  # G·M rows
        want = fast_llama.lora_b32_products(ye, plan).clone()
        modes[key] = None
        for fused in (1, 0):
            if torch.equal(products(ye, B, args, fused), want):
                ref, got = ye.clone(), ye.clone()
                fast_llama.add_lora_b32_ops(ref, plan)
                run(got, B, args + (fused,))
                if torch.equal(ref.view(torch.int16), got.view(torch.int16)):
                    modes[key] = fused
                break
        if modes[key] is None:
            log.info("the CPU LoRA kernel does not reproduce the PyTorch ops' sums for %s: not used there", key[:5])
    return modes[key]
