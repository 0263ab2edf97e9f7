"""Cache configuration: one frozen dataclass for every cache kind.

Every InnerQ technique is a field of its own so that each ablation (no hybrid,
symmetric only, no sinks, no recent window, no key normalization, outer
grouping, ...) runs through the same code. Invalid values raise ``ValueError``
naming the field and the allowed range, at construction time; the checks that
need the head dimension run in :meth:`CacheConfig.validate_head_dim`, which
every cache constructor calls.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Literal

import jax.numpy as jnp
import numpy as np

CacheKind = Literal["innerq", "outerq", "bf16", "int8"]
HybridPolicy = Literal["hybrid", "asymmetric", "symmetric"]
KeyNorm = Literal["centre_scale", "scale", "none"]
KeyScaleStat = Literal["absmax", "std"]
Rotation = Literal["none", "keys", "keys_values"]
ScaleDtype = Literal["bfloat16", "float16", "float8_e4m3fn"]
Axis = Literal["auto", "d", "t"]

_KINDS = ("innerq", "outerq", "bf16", "int8")
_HYBRID = ("hybrid", "asymmetric", "symmetric")
_KEY_NORM = ("centre_scale", "scale", "none")
_KEY_SCALE = ("absmax", "std")
_ROTATION = ("none", "keys", "keys_values")
_SCALE_DTYPES = ("bfloat16", "float16", "float8_e4m3fn")
_AXES = ("auto", "d", "t")
_SCALE_JNP = {"bfloat16": jnp.bfloat16, "float16": jnp.float16,
              "float8_e4m3fn": jnp.float8_e4m3fn}
_SCALE_TAG = {"float16": "fp16", "float8_e4m3fn": "fp8"}
_GROUP_SIZES = (16, 32, 64, 128)
# (key grouping, value grouping) of each quantized kind when k_axis / v_axis are "auto"
# (the dense kinds report OuterQ's pair; they have no groups)
_KIND_AXES = {"innerq": ("d", "t"), "outerq": ("t", "d")}


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"CacheConfig.{name}={value!r} is not allowed; choose one of {allowed}")


def is_int(value) -> bool:
    """A Python or numpy integer; bools are not sizes (True would count as 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class CacheConfig:
    """What the KV cache stores and how.

    kind: ``innerq`` (groups along the reduction dimension: K per token along
        D, V per channel along T), ``outerq`` (KIVI layout: K per channel along
        T, V per token along D), ``bf16`` (dense) or ``int8`` (per-token scale).
    bits: code width of the quantized region (2 or 4).
    group_size: G, values sharing one scale and zero-point.
    sink: S, first tokens kept in bf16 (attention sinks).
    recent: R, most recent tokens kept in bf16; the window holds R..R+G-1
        tokens and flushes its oldest G when it reaches R+G.
    hybrid: per-group choice between asymmetric and symmetric quantization.
    key_norm: per-channel key normalization computed at prefill:
        ``centre_scale`` stores (k - mu)/sigma, ``scale`` stores k/sigma,
        ``none`` stores k.
    key_scale: statistic behind sigma: max |k - mu| (``absmax``) or the
        standard deviation (``std``).
    rotation: InnerQ-H, an orthonormal Hadamard rotation along D applied to
        keys (``keys``) or keys and values (``keys_values``) before grouping.
    scale_dtype: storage dtype of scales and zero-points: ``bfloat16``,
        ``float16`` or ``float8_e4m3fn`` (1 byte, stored as such: scales round
        up and offsets down to fp8's 4 significant bits; a group whose scale
        or offset exceeds fp8's range (|x| > 448) gets a NaN scale, as a
        group with a non-finite value does; see ``quant.py``).
    key_scale_dtype: the same for the keys only (None: ``scale_dtype``).
    k_axis, v_axis: axis along which a key / value group runs: ``d`` (the
        head dimension), ``t`` (tokens) or ``auto`` (the kind's own: innerq K
        along D and V along T, outerq the other way). Packing does not change
        (K codes along D, V codes along T).
    key_group_size: the key group along D (None: ``group_size``); only when
        keys group along D. It must divide head_dim. Flushes still move
        ``group_size`` tokens, so a cache may hold G=16 key groups beside
        G=32 value groups.
    rotation_signs: randomized Hadamard: the rotation is H diag(s) with
        random signs s fixed per (layer, kv head), drawn from
        ``rotation_seed`` (needs rotation != ``none``). The signs are a
        cache leaf ``rot_signs`` [B, Hkv, D] (int8) of each layer, so
        prefill, append, the query and the output all read the same ones.
    rotation_seed: seed of those signs.
    capacity: static number of token slots per sequence.
    norm_eps: floor of sigma, so a constant channel never divides by zero.
    """

    kind: CacheKind = "innerq"
    bits: int = 2
    group_size: int = 32
    sink: int = 4
    recent: int = 128
    hybrid: HybridPolicy = "hybrid"
    key_norm: KeyNorm = "centre_scale"
    key_scale: KeyScaleStat = "absmax"
    rotation: Rotation = "none"
    scale_dtype: ScaleDtype = "bfloat16"
    capacity: int = 4096
    norm_eps: float = 1e-3
    k_axis: Axis = "auto"
    v_axis: Axis = "auto"
    key_group_size: int | None = None
    key_scale_dtype: ScaleDtype | None = None
    rotation_signs: bool = False
    rotation_seed: int = 0

    def __post_init__(self):
        for name in ("bits", "group_size", "sink", "recent", "capacity"):
            value = getattr(self, name)
            if not is_int(value):
                raise ValueError(f"CacheConfig.{name}={value!r} must be an int")
            object.__setattr__(self, name, int(value))  # numpy ints hash and print as ints
        eps = self.norm_eps
        if (isinstance(eps, (bool, np.bool_)) or not isinstance(eps, numbers.Real)
                or not (math.isfinite(eps) and eps > 0)):
            raise ValueError(f"CacheConfig.norm_eps={eps!r} must be a finite float > 0")
        object.__setattr__(self, "norm_eps", float(eps))
        _choice("kind", self.kind, _KINDS)
        _choice("hybrid", self.hybrid, _HYBRID)
        _choice("key_norm", self.key_norm, _KEY_NORM)
        _choice("key_scale", self.key_scale, _KEY_SCALE)
        _choice("rotation", self.rotation, _ROTATION)
        _choice("scale_dtype", self.scale_dtype, _SCALE_DTYPES)
        if self.key_scale_dtype is not None:
            _choice("key_scale_dtype", self.key_scale_dtype, _SCALE_DTYPES)
        _choice("k_axis", self.k_axis, _AXES)
        _choice("v_axis", self.v_axis, _AXES)
        if self.key_group_size is not None:
            if not is_int(self.key_group_size):
                raise ValueError(f"CacheConfig.key_group_size={self.key_group_size!r} must be "
                                 f"an int or None")
            object.__setattr__(self, "key_group_size", int(self.key_group_size))
            if self.key_group_size not in _GROUP_SIZES:
                raise ValueError(f"CacheConfig.key_group_size={self.key_group_size!r} is not "
                                 f"allowed; choose one of {_GROUP_SIZES} or None")
        if not isinstance(self.rotation_signs, (bool, np.bool_)):
            raise ValueError(f"CacheConfig.rotation_signs={self.rotation_signs!r} must be a bool")
        object.__setattr__(self, "rotation_signs", bool(self.rotation_signs))
        if not is_int(self.rotation_seed) or self.rotation_seed < 0:
            raise ValueError(f"CacheConfig.rotation_seed={self.rotation_seed!r} must be a "
                             f"non-negative int")
        object.__setattr__(self, "rotation_seed", int(self.rotation_seed))
        if self.bits not in (2, 4):
            raise ValueError(f"CacheConfig.bits={self.bits!r} is not allowed; choose 2 or 4")
        if self.group_size not in _GROUP_SIZES:
            raise ValueError(
                f"CacheConfig.group_size={self.group_size!r} is not allowed; choose one of "
                f"{_GROUP_SIZES}"
            )
        if self.sink < 0:
            raise ValueError(f"CacheConfig.sink={self.sink!r} must be a non-negative int")
        if self.recent < 0 or self.recent % self.group_size:
            raise ValueError(
                f"CacheConfig.recent={self.recent!r} must be a non-negative multiple of "
                f"group_size={self.group_size}"
            )
        if self.capacity % self.group_size:
            raise ValueError(
                f"CacheConfig.capacity={self.capacity!r} must be a multiple of "
                f"group_size={self.group_size}"
            )
        if self.quantized and self.capacity < self.sink + self.recent + self.group_size:
            raise ValueError(
                f"CacheConfig.capacity={self.capacity} must be at least sink + recent + "
                f"group_size = {self.sink + self.recent + self.group_size} for a quantized cache"
            )
        if self.capacity <= 0:
            raise ValueError(f"CacheConfig.capacity={self.capacity} must be positive")
        if self.kind != "innerq" and self.rotation != "none":
            # OuterQ and the dense baselines are the paper's comparison points.
            raise ValueError(
                f"CacheConfig.rotation={self.rotation!r} is only defined for kind='innerq'"
            )
        if self.rotation_signs and self.rotation == "none":
            raise ValueError("CacheConfig.rotation_signs=True needs a rotation ('keys' or "
                             "'keys_values'); got rotation='none'")
        if not self.quantized:
            for name, default in (("k_axis", "auto"), ("v_axis", "auto"),
                                  ("key_group_size", None), ("key_scale_dtype", None)):
                if getattr(self, name) != default:
                    raise ValueError(f"CacheConfig.{name}={getattr(self, name)!r} is only "
                                     f"defined for a quantized cache (kind 'innerq' or "
                                     f"'outerq'), not kind={self.kind!r}")
        if self.key_group_size is not None and self.k_grouping != "d":
            raise ValueError(
                f"CacheConfig.key_group_size={self.key_group_size} is only defined when keys "
                f"group along D; these keys group along T (kind={self.kind!r}, "
                f"k_axis={self.k_axis!r}): their groups are the flush groups of "
                f"group_size={self.group_size} tokens")

    # ----------------------------------------------------------------- presets
    @classmethod
    def innerq(cls, **overrides) -> "CacheConfig":
        """Paper-faithful InnerQ: hybrid, sinks, recent window, centre + scale."""
        return cls(**{"kind": "innerq", **overrides})

    @classmethod
    def innerq_h(cls, **overrides) -> "CacheConfig":
        """InnerQ-H: InnerQ with keys and values Hadamard-rotated."""
        return cls(**{"kind": "innerq", "rotation": "keys_values", **overrides})

    @classmethod
    def recommended(cls, **overrides) -> "CacheConfig":
        """The project's recommended 2-bit inner-grouped cache: InnerQ-H (keys and values
        rotated) with 36 sink and 96 recent tokens, the same bytes as paper-faithful InnerQ.

        Chosen by the search in ``benchmarks/results/fidelity_summary.md`` (SmolLM2-135M,
        8 windows of WikiText-2 and of GSM8K solutions): the lowest perplexity among the
        inner-grouped candidates at <= 0.40 B per quantized element on both texts.
        """
        return cls.innerq_h(**{"sink": 36, "recent": 96, **overrides})

    @classmethod
    def outerq(cls, **overrides) -> "CacheConfig":
        """KIVI layout as published: asymmetric, recent window, no sinks, no normalization."""
        base = {"kind": "outerq", "sink": 0, "hybrid": "asymmetric", "key_norm": "none"}
        return cls(**{**base, **overrides})

    @classmethod
    def bf16(cls, **overrides) -> "CacheConfig":
        base = {"kind": "bf16", "sink": 0, "recent": 0, "key_norm": "none"}
        return cls(**{**base, **overrides})

    @classmethod
    def int8(cls, **overrides) -> "CacheConfig":
        base = {"kind": "int8", "sink": 0, "recent": 0, "key_norm": "none"}
        return cls(**{**base, **overrides})

    def replace(self, **changes) -> "CacheConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------- derived
    @property
    def quantized(self) -> bool:
        """Whether the cache has a group-quantized region (innerq / outerq)."""
        return self.kind in ("innerq", "outerq")

    @property
    def codes_per_word(self) -> int:
        return 32 // self.bits

    @property
    def window(self) -> int:
        """Slots of the recent ring buffer: R + G."""
        return self.recent + self.group_size

    @property
    def quant_capacity(self) -> int:
        """Token slots of the quantized region: the most a full sequence can hold.

        A sequence of ``capacity`` tokens keeps min(S, len) sink tokens and at
        least R recent ones, so at most capacity - S - R tokens, rounded down to
        whole groups, are ever quantized.
        """
        if not self.quantized:
            return 0
        free = self.capacity - self.sink - self.recent
        return (free // self.group_size) * self.group_size

    @property
    def scale_jnp_dtype(self):
        """Storage dtype of the value scales and zero-points."""
        return _SCALE_JNP[self.scale_dtype]

    @property
    def key_scale_jnp_dtype(self):
        """Storage dtype of the key scales and zero-points."""
        return _SCALE_JNP[self.key_scale_dtype or self.scale_dtype]

    @property
    def k_group(self) -> int:
        """Values per key group: key_group_size along D, else group_size."""
        return self.key_group_size or self.group_size

    @property
    def k_grouping(self) -> Literal["d", "t"]:
        """Axis along which a key group runs: ``d`` (head_dim) or ``t`` (tokens)."""
        return self.k_axis if self.k_axis != "auto" else _KIND_AXES.get(self.kind, ("t", "d"))[0]

    @property
    def v_grouping(self) -> Literal["d", "t"]:
        return self.v_axis if self.v_axis != "auto" else _KIND_AXES.get(self.kind, ("t", "d"))[1]

    @property
    def kernel_unsupported(self) -> tuple[str, ...]:
        """Fields set away from their defaults that the TPU and Mosaic GPU kernels do not
        read (the fused Triton kernel reads more: :attr:`fused_unsupported`).

        ``rotation_signs`` is not among them: the signs, like the rotation, are
        applied outside the kernel (to q before it, to the output after it, to k
        and v as they enter the cache), so a kernel sees the same contract."""
        out = []
        own = _KIND_AXES.get(self.kind)
        if own and self.k_grouping != own[0]:
            out.append(f"k_axis={self.k_axis!r}")
        if own and self.v_grouping != own[1]:
            out.append(f"v_axis={self.v_axis!r}")
        if self.key_group_size is not None and self.key_group_size != self.group_size:
            out.append(f"key_group_size={self.key_group_size}")
        for name in ("scale_dtype", "key_scale_dtype"):
            if getattr(self, name) == "float8_e4m3fn":
                out.append(f"{name}='float8_e4m3fn'")
        return tuple(out)

    @property
    def fused_unsupported(self) -> tuple[str, ...]:
        """Fields the fused Triton kernel (``backend='pallas'`` / ``'interpret'``) cannot read.

        It reads all four (key, value) grouping layouts, key groups along D smaller than
        ``group_size`` (with values along T) and fp8 scales; what is left is a key group
        size different from the value group when both group along D."""
        if (self.quantized and self.k_grouping == "d" and self.v_grouping == "d"
                and self.key_group_size not in (None, self.group_size)):
            return (f"key_group_size={self.key_group_size} with v_axis='d'",)
        return ()

    @property
    def rotate_keys(self) -> bool:
        return self.rotation in ("keys", "keys_values")

    @property
    def rotate_values(self) -> bool:
        return self.rotation == "keys_values"

    def validate_head_dim(self, head_dim: int) -> None:
        """Checks that need the model's head dimension D."""
        if not is_int(head_dim) or head_dim <= 0:
            raise ValueError(f"head_dim={head_dim!r} must be a positive int")
        if not self.quantized:
            return
        if head_dim % self.group_size:
            raise ValueError(
                f"CacheConfig.group_size={self.group_size} must divide head_dim={head_dim}"
            )
        if self.key_group_size is not None and head_dim % self.key_group_size:
            raise ValueError(
                f"CacheConfig.key_group_size={self.key_group_size} must divide "
                f"head_dim={head_dim}"
            )
        if head_dim % 32:
            raise ValueError(
                f"head_dim={head_dim} must be a multiple of 32 for a {self.bits}-bit cache "
                "(codes and mask bits are packed into 32-bit words)"
            )
        if self.rotation != "none" and head_dim & (head_dim - 1):
            raise ValueError(
                f"CacheConfig.rotation={self.rotation!r} needs a power-of-two head_dim "
                f"(Hadamard rotation); got head_dim={head_dim}"
            )

    def short_name(self) -> str:
        """A compact label for tables and plots."""
        if self.kind in ("bf16", "int8"):
            return self.kind
        name = "innerq-h" if self.rotation != "none" else self.kind
        parts = [f"{name}{self.bits}", f"G{self.group_size}", f"S{self.sink}", f"R{self.recent}"]
        if self.rotation == "keys":
            parts.append("rotK")
        if self.hybrid != "hybrid":
            parts.append(self.hybrid[:4])
        if self.kind == "innerq" and self.key_norm != "centre_scale":
            parts.append(f"norm-{self.key_norm}")
        if self.key_scale != "absmax":
            parts.append(f"sigma-{self.key_scale}")
        if self.k_axis != "auto" or self.v_axis != "auto":
            parts.append(f"K{self.k_grouping}V{self.v_grouping}")
        if self.key_group_size is not None:
            parts.append(f"KG{self.key_group_size}")
        if self.scale_dtype != "bfloat16":
            parts.append(f"{_SCALE_TAG[self.scale_dtype]}scale")
        if self.key_scale_dtype is not None:
            parts.append(f"K{_SCALE_TAG.get(self.key_scale_dtype, 'bf16')}scale")
        if self.rotation_signs:
            parts.append(f"signs{self.rotation_seed}")
        elif self.rotation_seed:
            parts.append(f"seed{self.rotation_seed}")
        return "-".join(parts)
