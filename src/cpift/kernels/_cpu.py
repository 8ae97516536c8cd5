# Shared pieces of the fused CPU kernels (the `_*_cpu.py` files), compiled by numba and imported only
# when a CPU-backend kernel runs: storage loads and stores (bfloat16 and float16 as uint16 bits, one
# rounding to nearest even on store, as torch's), the BLOCK size and numba's thread count.
# Deterministic: reductions are per-block partials folded in block order on the host.
# Design notes (the maths, bytes per entry, exactness): docs/kernels.md#kernels_cpupy
from __future__ import annotations

import os

import numpy as np
import torch
from llvmlite import ir
from numba import config as numba_config
from numba import get_num_threads, njit, set_num_threads, types
from numba.core import cgutils
from numba.extending import intrinsic

F32, BF16, F16 = 0, 1, 2
# Entries per work block: large enough to amortise scheduling, small enough for many blocks per
# thread (a busy core then delays one block, not half the tensor).
BLOCK = 1 << 16

_KINDS = {torch.float32: F32, torch.bfloat16: BF16, torch.float16: F16}


def supports(*tensors: torch.Tensor | None) -> bool:
    """True when every given tensor is a contiguous CPU tensor of a dtype the fused kernels handle."""
    return all(
        t is None or (t.device.type == "cpu" and t.dtype in _KINDS and t.is_contiguous()) for t in tensors
    )


def as_array(t: torch.Tensor) -> tuple[np.ndarray, int]:
    """A 1-D numpy view of t's storage (no copy) and its kind code (F32, BF16 or F16)."""
    kind = _KINDS[t.dtype]
    flat = t.reshape(-1)
    if kind == F32:
        return flat.numpy(), kind
    return flat.view(torch.uint16).numpy(), kind


def sync_threads() -> None:
    """Run numba's parallel loops on as many threads as torch's (the --threads option sets torch's).

    At most numba's pool size (NUMBA_NUM_THREADS, the core count by default): torch accepts more.
    Starting the pool (the first get_num_threads) resets the OpenMP thread count that torch reads to
    the pool size, so torch's count is read before and put back after."""
    n = torch.get_num_threads()
    current = get_num_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    n = max(1, min(n, numba_config.NUMBA_NUM_THREADS, 64))
    if current != n:
        set_num_threads(n)


def blocks(n: int) -> int:
    """The number of BLOCK-sized work blocks covering n entries."""
    return (n + BLOCK - 1) // BLOCK


@intrinsic
def _u32_as_f32(typingctx, x):
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _f32_as_u32(typingctx, x):
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def _f16_bits_to_f32(typingctx, x):
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def _f32_to_f16_bits(typingctx, x):
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


@njit(inline="always", cache=True)
def f32_bits(v):
    """The IEEE bits of a float32 as uint32."""
    return _f32_as_u32(np.float32(v))


@njit(inline="always", cache=True)
def bits_f32(u):
    """The float32 whose IEEE bits are the uint32 u."""
    return _u32_as_f32(np.uint32(u))


@njit(inline="always", cache=True)
def bf16_round(v):
    """float32 → bfloat16 bits, round to nearest even; NaN → 0x7FC0."""
    u = _f32_as_u32(np.float32(v))
    if v != v:
        return np.uint16(0x7FC0)
    return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(inline="always", cache=True)
def load(x, i, kind):
    """Entry i of storage array x (of kind F32, BF16 or F16) as float32."""
    if kind == BF16:
        return _u32_as_f32(np.uint32(x[i]) << np.uint32(16))
    if kind == F16:
        return _f16_bits_to_f32(np.uint16(x[i]))
    return np.float32(x[i])


@njit(inline="always", cache=True)
def store(out, i, v, kind):
    """Round the float32 v once into entry i of storage array out (of kind F32, BF16 or F16)."""
    if kind == BF16:
        out[i] = bf16_round(v)
    elif kind == F16:
        out[i] = _f32_to_f16_bits(np.float32(v))
    else:
        out[i] = np.float32(v)


# Dynamic scheduling: numba's `prange` hands each thread one fixed share of the iterations (the omp
# layer schedules statically, whatever the chunk size), so a kernel runs `prange(workers)` and each
# worker claims work blocks from a shared counter until none is left: a core another process takes
# then delays the one block it holds, not half the tensor. Results never depend on which worker ran
# a block (partials are kept per block, integer counts per worker), so they stay deterministic.
@intrinsic
def _fetch_add(typingctx, counter):
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64):
        return None
    sig = types.int64(counter)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.atomic_rmw("add", ary.data, ir.Constant(ir.IntType(64), 1), "monotonic")

    return sig, codegen


@njit(inline="always", cache=True)
def claim(counter):
    """Atomically take the next work-block number from counter[0] (an int64 array); returns the old value."""
    return _fetch_add(counter)


def workers(nblocks: int) -> int:
    """How many workers to start for nblocks work blocks: numba's thread count, at most one per block."""
    return max(1, min(get_num_threads(), nblocks))


# --- Raw-address access (the element-wise merge kernels) -------------------------------------------
# Inputs reach those kernels as int64 data addresses with per-tensor kind codes, not as numpy arrays:
# one compiled specialisation serves every mix of storage dtypes and any number of models (arrays of
# float32 and uint16 would compile one version per combination). The caller keeps the tensors alive
# for the call. `fma` is LLVM's fused multiply-add: torch's add_(x, alpha=w) on the CPU is one fused
# multiply-add per entry (Vectorized fmadd, tails included; checked on this AVX-512 build), and numba
# never contracts a*b + c by itself (no fastmath), so the kernels spell those steps as fma.


def address(t: torch.Tensor) -> int:
    """The data address of a contiguous CPU tensor (0 for an empty one)."""
    return t.data_ptr() if t.numel() else 0


def addresses(tensors) -> tuple[np.ndarray, np.ndarray]:
    """int64 arrays of the data addresses and kind codes of the given tensors (see `supports`)."""
    return (np.array([address(t) for t in tensors], dtype=np.int64),
            np.array([_KINDS[t.dtype] for t in tensors], dtype=np.int64))


@intrinsic
def _peek16(typingctx, addr, i):
    sig = types.uint16(types.int64, types.int64)

    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.IntType(16).as_pointer())
        return builder.load(builder.gep(ptr, [args[1]]))

    return sig, codegen


@intrinsic
def _peek32(typingctx, addr, i):
    sig = types.float32(types.int64, types.int64)

    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.FloatType().as_pointer())
        return builder.load(builder.gep(ptr, [args[1]]))

    return sig, codegen


@intrinsic
def _poke16(typingctx, addr, i, v):
    sig = types.void(types.int64, types.int64, types.uint16)

    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.IntType(16).as_pointer())
        builder.store(args[2], builder.gep(ptr, [args[1]]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _poke32(typingctx, addr, i, v):
    sig = types.void(types.int64, types.int64, types.float32)

    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.FloatType().as_pointer())
        builder.store(args[2], builder.gep(ptr, [args[1]]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _fma32(typingctx, a, b, c):
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32, f32, f32]), "llvm.fma.f32")
        return builder.call(fn, args)

    return sig, codegen


@njit(inline="always", cache=True)
def fma(a, b, c):
    """a·b + c in float32 with one rounding."""
    return _fma32(np.float32(a), np.float32(b), np.float32(c))


@njit(inline="always", cache=True)
def load_at(addr, i, kind):
    """Entry i of the tensor at address addr (of kind F32, BF16 or F16) as float32."""
    if kind == BF16:
        return _u32_as_f32(np.uint32(_peek16(addr, i)) << np.uint32(16))
    if kind == F16:
        return _f16_bits_to_f32(_peek16(addr, i))
    return _peek32(addr, i)


@njit(inline="always", cache=True)
def store_at(addr, i, v, kind):
    """Round the float32 v once into entry i of the tensor at addr; return 1 if the stored value is
    NaN or ±inf (an overflow on store included), else 0."""
    if kind == BF16:
        h = bf16_round(v)
        _poke16(addr, i, h)
        return np.int64((h & np.uint16(0x7F80)) == np.uint16(0x7F80))
    if kind == F16:
        h = _f32_to_f16_bits(np.float32(v))
        _poke16(addr, i, h)
        return np.int64((h & np.uint16(0x7C00)) == np.uint16(0x7C00))
    _poke32(addr, i, np.float32(v))
    return np.int64((_f32_as_u32(np.float32(v)) & np.uint32(0x7F800000)) == np.uint32(0x7F800000))


# --- Threading layer ------------------------------------------------------------------------------
# omp first, then tbb, then workqueue as the last resort: omp was as fast or faster in the measurement
# (docs/benchmarks.md#fused-cpu-kernels-threading-layer-and-block-size), and unlike workqueue it is safe
# when two Python threads launch kernels at once (workqueue aborts the process). NUMBA_THREADING_LAYER
# still overrides this.
if "NUMBA_THREADING_LAYER" not in os.environ and "NUMBA_THREADING_LAYER_PRIORITY" not in os.environ:
    numba_config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]


# --- Spans: loads and stores specialised on the storage kind --------------------------------------
# `load_at`/`store_at` branch on a runtime kind per entry, which keeps LLVM from vectorising the loop.
# The element-wise kernels instead move SPAN entries at a time between storage and float32 buffers:
# each span loop is compiled once per kind with the kind a constant (bfloat16 and float32 are the
# common cases; float16 keeps the generic loop), so it vectorises, and the arithmetic between them runs
# on plain float32 arrays. Per entry the operations and their order are unchanged, so are the bits.
SPAN = 1024


@njit(inline="always", cache=True)
def _load_loop(addr, kind, i0, n, dst):
    for j in range(n):
        dst[j] = load_at(addr, i0 + j, kind)


@njit(inline="always", cache=True)
def load_span(addr, kind, i0, n, dst):
    """dst[:n] ← entries i0 … i0 + n − 1 of the tensor at addr (of kind F32, BF16 or F16) as float32."""
    if kind == BF16:
        _load_loop(addr, BF16, i0, n, dst)
    elif kind == F32:
        _load_loop(addr, F32, i0, n, dst)
    else:
        _load_loop(addr, kind, i0, n, dst)


@njit(inline="always", cache=True)
def load_abs_delta(x, xk, b, bk, has_base, i0, n, dst, tmp):
    """dst[:n] ← the float32 scores |x − b| of entries i0 … i0 + n − 1 (|x| without a base; tmp: a second
    buffer of n), widened and subtracted in float32 as the torch backend does."""
    load_span(x, xk, i0, n, dst)
    if has_base:
        load_span(b, bk, i0, n, tmp)
        for j in range(n):
            dst[j] = abs(dst[j] - tmp[j])
    else:
        for j in range(n):
            dst[j] = abs(dst[j])


@njit(inline="always", cache=True)
def _store_loop(addr, kind, i0, n, src):
    flag = 0
    for j in range(n):
        flag |= store_at(addr, i0 + j, src[j], kind)
    return flag


@njit(inline="always", cache=True)
def store_span(addr, kind, i0, n, src):
    """Round src[:n] once into entries i0 … i0 + n − 1 of the tensor at addr; 1 if any stored value is
    NaN or ±inf, else 0."""
    if kind == BF16:
        return _store_loop(addr, BF16, i0, n, src)
    if kind == F32:
        return _store_loop(addr, F32, i0, n, src)
    return _store_loop(addr, kind, i0, n, src)
