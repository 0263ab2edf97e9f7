"""Pallas primitives the Triton lowering lacks, each with a plain-jnp meaning.

* :func:`dot_acc` - ``acc + a @ b`` lowered to one ``tt.dot(a, b, acc)``. Pallas
  lowers ``acc + jnp.dot(a, b)`` to a dot with a zero accumulator followed by an
  elementwise add, and Triton 3.6 no longer fuses the two: a chain of partial
  dots then costs an FADD per accumulator element per dot (measured offline:
  2 FADD per code). With the accumulator inside the MMA that cost is 0.
* :func:`unpack_pairs_bf16` - code j and code j + cpw/2 of every word
  as a bf16 pair ``128 + code * 2**e_j`` (the "magic-number" conversion: the
  code placed in the mantissa of the bf16 128.0): one ``lop3`` per pair, no I2F,
  no PRMT, and the pair stays in the MMA operand layout. The offset 128 and
  ``2**e_j`` are exact and are folded into the other operand of the dot and into
  the per-group zero-point term.
  Both layouts pack their codes along the dot product's reduction axis, so the
  InnerQ and OuterQ kernels share this one unpack.
* ``max_registers`` on the unpack primitive sets Triton's ``ttg.maxnreg``
  (registers per thread), which jax's ``CompilerParams`` cannot.
* :func:`call_quietly` - lowers a ``pallas_call`` inside a filter for exactly
  the Pallas Triton deprecation warning (raised at lowering time, so the filter
  must sit around the lowering, also under an outer jit). Its batching rule
  vmaps the wrapped call (Pallas adds a grid axis), so ``jax.vmap`` works over
  every kernel (tests/test_vmap.py).

All are ordinary primitives for interpret mode (CPU), so the kernels run the
same code there. The Triton lowering rules use jax internals
(``jax._src.pallas.triton.lowering``, ``jax._src.lib.triton``); they were
checked against jax 0.11.2 (the version the project pins). A jax without them
still imports this module and runs interpret mode; the first compiled kernel
launch then raises, naming the jax version the kernels need.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import jax
import jax.numpy as jnp
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

CHECKED_JAX = "0.11.2"  # the jax whose internals the Triton lowering rules were checked on

try:
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as tt_dialect
    from jax._src.pallas.triton import lowering as triton_lowering

    register_triton_lowering = triton_lowering.register_lowering
    missing_internals: Exception | None = None
except (ImportError, AttributeError) as err:
    # Not fatal here: interpret mode needs none of it. A compiled launch reports it.
    missing_internals = err


class MissingJaxInternals(RuntimeError):
    """The installed jax lacks the internals the compiled Triton kernels use."""

    def __init__(self, err: Exception):
        super().__init__(
            f"the compiled Pallas Triton kernels use jax internals checked with jax "
            f"{CHECKED_JAX}, which this jax {jax.__version__} does not provide "
            f"({type(err).__name__}: {err}). Install jax {CHECKED_JAX} (bash setup.sh --gpu, "
            f"or pip install 'jax[cuda13]=={CHECKED_JAX}'), or run with backend='reference' "
            "or 'interpret'")


@contextlib.contextmanager
def _explain_missing_internals():
    """Lowers a kernel; without the internals (no lowering rules for these primitives)
    a compiled lowering fails, and the error then says which jax the kernels need."""
    try:
        yield
    except MissingJaxInternals:
        raise
    except Exception as err:
        if missing_internals is None:
            raise
        raise MissingJaxInternals(missing_internals) from err


_TRITON_DEPRECATION = r"The Pallas Triton backend is deprecated"


@contextlib.contextmanager
def quiet_triton_deprecation():
    """Silences exactly the Pallas Triton backend deprecation warning (jax 0.11)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TRITON_DEPRECATION, category=DeprecationWarning)
        yield


# The warning is raised when the pallas_call is *lowered*, which under an outer
# jit happens long after the call returned. ``call_quietly`` binds a primitive
# whose lowering rule lowers the kernel inside ``quiet_triton_deprecation``, so
# the filter covers exactly this kernel's lowering, eager or jitted.
quiet_call_p = Primitive("innerq_quiet_pallas_call")
quiet_call_p.multiple_results = True


@quiet_call_p.def_impl
def _quiet_call_impl(*args, fn):  # eager: the kernel compiles right here
    with quiet_triton_deprecation(), _explain_missing_internals():
        return list(fn(*args))


@quiet_call_p.def_abstract_eval
def _quiet_call_abstract(*avals, fn):
    out = jax.eval_shape(fn, *[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals])
    return [ShapedArray(o.shape, o.dtype) for o in out]


def _quiet_call_lowering(ctx, *args, fn):
    with quiet_triton_deprecation(), _explain_missing_internals():
        return mlir.lower_fun(lambda *xs: list(fn(*xs)), multiple_results=True)(ctx, *args)


mlir.register_lowering(quiet_call_p, _quiet_call_lowering)


@functools.lru_cache(maxsize=256)
def _batched(fn, in_axes: tuple):
    """``fn`` over a leading batch axis (one object per (fn, in_axes), so that the bound
    primitive, and every jit cache keyed on it, sees the same function each trace)."""
    return jax.vmap(lambda *xs: tuple(fn(*xs)), in_axes=in_axes, out_axes=0)


def _quiet_call_batch(args, dims, *, fn):
    """jax.vmap over a wrapped kernel: the kernel's own batching (Pallas adds a grid axis),
    still lowered inside the filter; every output batched on axis 0."""
    in_axes = tuple(None if d is None else int(d) for d in dims)  # None: not batched
    outs = quiet_call_p.bind(*args, fn=_batched(fn, in_axes))
    return outs, [0] * len(outs)


batching.primitive_batchers[quiet_call_p] = _quiet_call_batch


_EXACT_BF16_FLAG = "--xla_allow_excess_precision=false"


def check_interpret_platform(platform: str | None = None) -> None:
    """Interpret mode runs a kernel's body as XLA ops. The kernels' math relies on exact
    bf16 roundings (the MMA operands' offsets, 128 * sum of the rounded operand, must match
    the operand the MMA sees), and XLA on a GPU drops ``f32 -> bf16 -> f32`` round trips by
    default (excess precision): measured relative error 1e-1 on an H200, 3e-6 against the
    compiled kernel with the flag below (benchmarks/KERNEL_NOTES.md, round 9). Raises on a
    GPU unless XLA_FLAGS turns excess precision off."""
    platform = platform or jax.default_backend()
    flags = os.environ.get("XLA_FLAGS", "").split()
    if platform in ("gpu", "cuda", "rocm") and not any(
            f in (_EXACT_BF16_FLAG, "--xla_allow_excess_precision=0") for f in flags):
        raise RuntimeError(
            "Pallas interpret mode on a GPU needs exact bf16 roundings, which XLA drops there by "
            f"default: set XLA_FLAGS={_EXACT_BF16_FLAG} before jax starts, or run the compiled "
            "kernel (backend='pallas') or interpret mode on the CPU")


def call_quietly(fn, *args, interpret: bool = False):
    """fn(*args) (fn returns a sequence of arrays; keep fn identical across calls for caching).
    ``interpret``: fn is a kernel in Pallas interpret mode whose math needs exact bf16
    roundings (:func:`check_interpret_platform`, checked here at every call)."""
    if interpret:
        check_interpret_platform()
    return quiet_call_p.bind(*args, fn=fn)


# ------------------------------------------------------------------ dot_acc
dot_acc_p = Primitive("innerq_dot_acc")


def _dot_acc_impl(acc, a, b):
    return acc + jnp.dot(a, b, preferred_element_type=acc.dtype)


def _dot_acc_abstract(acc, a, b):
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"dot_acc: bad operand shapes {a.shape} @ {b.shape}")
    if acc.shape != (a.shape[0], b.shape[1]):
        raise ValueError(f"dot_acc: accumulator {acc.shape} != {(a.shape[0], b.shape[1])}")
    return ShapedArray(acc.shape, acc.dtype)


dot_acc_p.def_impl(_dot_acc_impl)
dot_acc_p.def_abstract_eval(_dot_acc_abstract)
mlir.register_lowering(dot_acc_p, mlir.lower_fun(_dot_acc_impl, multiple_results=False))


def dot_acc(acc: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """``acc + a @ b`` (f32 accumulator) with the accumulation inside the MMA."""
    return dot_acc_p.bind(acc, a, b)


# -------------------------------------------------------------- pair unpack
@functools.cache
def pair_plan(bits: int) -> tuple[tuple[int, int], ...]:
    """For code pair j = (code j, code j + cpw/2) of a word: (shift, e).

    Code j sits in the word's low 16-bit half at bit bits*j and code j + cpw/2 at
    the same place of the high half, so one ``lop3`` of the word, shifted right by
    ``shift``, gives both as bf16 128 + code * 2**e (low half, high half).
    """
    if bits == 2:  # 8 pairs; mantissa slots 0, 2, 4
        return tuple((6 * (j // 3), 2 * j - 6 * (j // 3)) for j in range(8))
    if bits == 4:  # 4 pairs; mantissa slots 0, 3
        return tuple(zip((0, 1, 8, 9), (0, 3, 0, 3)))
    raise ValueError(f"bits={bits}; the kernels support 2 and 4")


unpack_pairs_p = Primitive("innerq_unpack_pairs_bf16")
unpack_pairs_p.multiple_results = True


def _unpack_pairs_impl(words2, *, bits, which, max_registers):
    del max_registers
    w = words2.astype(jnp.uint32)
    half = 16 // bits
    i = jax.lax.broadcasted_iota(jnp.uint32, w.shape, w.ndim - 1)  # 0: code j, 1: code j + cpw/2
    mask = jnp.uint32((1 << bits) - 1)
    plan = pair_plan(bits)
    out = []
    for j in which:
        c = ((w >> (jnp.uint32(bits * j) + i * jnp.uint32(bits * half))) & mask).astype(jnp.float32)
        out.append((128.0 + c * float(2 ** plan[j][1])).astype(jnp.bfloat16))
    return out


def _unpack_pairs_abstract(words2, *, bits, which, max_registers):
    del max_registers
    if words2.dtype != jnp.uint32 or words2.shape[-1] != 2:
        raise ValueError(f"unpack_pairs_bf16 needs uint32 words [..., 2], got {words2.dtype}{words2.shape}")
    return [ShapedArray(words2.shape, jnp.bfloat16)] * len(which)


unpack_pairs_p.def_impl(_unpack_pairs_impl)
unpack_pairs_p.def_abstract_eval(_unpack_pairs_abstract)
mlir.register_lowering(unpack_pairs_p, mlir.lower_fun(_unpack_pairs_impl, multiple_results=True))


@functools.cache
def _unpack_pairs_ptx(bits: int, which: tuple[int, ...]) -> str:
    """PTX for one element pair (the same word twice: $n, $n+1) -> one register per j."""
    n = len(which)
    m = (1 << bits) - 1
    plan = pair_plan(bits)
    shifts = sorted({plan[j][0] for j in which if plan[j][0]})
    lines = ["{"]
    if shifts:
        lines.append(".reg .b32 " + ", ".join(f"y{s}" for s in shifts) + ";")
        lines += [f"shr.u32 y{s}, ${n}, {s};" for s in shifts]
    for k, j in enumerate(which):
        sh, e = plan[j]
        src = f"y{sh}" if sh else f"${n}"
        lines.append(f"lop3.b32 ${k}, {src}, {(m << e) * 0x10001:#x}, 0x43004300, 0xea;")
    lines.append("}")
    return "\n".join(lines)


def unpack_pairs_bf16(words: jax.Array, bits: int, which, max_registers: int = 0) -> list[jax.Array]:
    """uint32 words [...] -> per pair j in ``which`` a bf16 array [..., 2]:
    [..., 0] = 128 + code_j * 2**e_j, [..., 1] = 128 + code_{j+cpw/2} * 2**e_j.

    The pair axis is a ``join`` of the words with themselves; Triton keeps it in
    the thread, so after a reshape to [..., 2n] the codes are already in the
    MMA operand layout (no shared-memory round trip), and each pair costs one
    ``lop3`` (plus a shared shift).

    max_registers > 0 caps the registers per thread of the whole kernel (Triton's
    ``ttg.maxnreg`` module attribute, which jax's CompilerParams cannot set; ptxas
    otherwise takes up to 255, and the kernel then runs one or two CTAs per SM).
    """
    words2 = jnp.stack([words, words], axis=-1)
    return unpack_pairs_p.bind(words2, bits=bits, which=tuple(which),
                               max_registers=int(max_registers))


def pair_exponents(bits: int) -> tuple[int, ...]:
    return tuple(e for _, e in pair_plan(bits))


def _with_checked_internals(rule):
    """A lowering rule whose use of jax internals fails with the jax version it needs."""
    @functools.wraps(rule)
    def wrapped(*args, **kwargs):
        try:
            return rule(*args, **kwargs)
        except (AttributeError, TypeError) as err:
            raise MissingJaxInternals(err) from err
    return wrapped


if missing_internals is None:

    @register_triton_lowering(dot_acc_p)
    @_with_checked_internals
    def _dot_acc_triton(ctx, acc, a, b):
        del ctx
        return tt_dialect.dot(a, b, acc)

    def _set_maxnreg(n: int) -> None:
        """Caps the kernel's registers per thread (module attribute ttg.maxnreg)."""
        op = ir.InsertionPoint.current.block.owner
        while op is not None and op.name != "builtin.module":
            op = op.parent
        if op is not None:
            op.attributes["ttg.maxnreg"] = ir.IntegerAttr.get(ir.IntegerType.get_signless(32), n)

    @register_triton_lowering(unpack_pairs_p)
    @_with_checked_internals
    def _unpack_pairs_triton(ctx, words2, *, bits, which, max_registers):
        if max_registers:
            _set_maxnreg(max_registers)
        n = len(which)
        out_types = [mlir.aval_to_ir_type(ctx.context.mlir_ctx, a) for a in ctx.avals_out]
        res = tt_dialect.elementwise_inline_asm(
            out_types, _unpack_pairs_ptx(bits, which), constraints=",".join(["=r"] * n + ["r", "r"]),
            pure=True, packed_element=2, args=[words2],
        )
        return [res] if isinstance(res, ir.Value) else list(res)
