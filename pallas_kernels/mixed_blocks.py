"""The fused kernel's layouts: geometry, operands and quantized part of each of the four.

Keys and values each group either along the reduction dimension of their product (keys
along D, values along T: inner) or across it (keys along T, values along D: outer). The
inner-inner layout is InnerQ (:mod:`pallas_kernels.innerq_blocks`), outer-outer is
OuterQ / KIVI (:mod:`pallas_kernels.outerq_blocks`). The mixed ones reuse those blocks:

* ``("t", "t")``: keys per channel along T (KIVI keys) with InnerQ values;
* ``("d", "d")``: InnerQ keys with values per token along D (KIVI values).

Codes are packed as in every layout (K along D, V along T); the geometry only changes
which groups the accumulator columns hold (K columns: token groups for keys along T,
channel groups for keys along D; V columns: token groups for values along T, channel
groups for values along D).
"""

from __future__ import annotations

import jax

from pallas_kernels import innerq_blocks as ib
from pallas_kernels import outerq_blocks as ob

LAYOUTS = (("d", "t"), ("t", "d"), ("t", "t"), ("d", "d"))  # (K grouping, V grouping)


class KtVtGeometry(ib.Geometry):
    """Keys along T (columns: the block's token groups), values along T (inner)."""

    @property
    def k_col_groups(self) -> int:
        return self.ngv


class KdVdGeometry(ib.Geometry):
    """Keys along D (inner), values along D (columns: channel groups)."""

    @property
    def v_col_groups(self) -> int:
        return self.ng


def geometry_class(layout):
    return {("d", "t"): ib.Geometry, ("t", "d"): ob.Geometry, ("t", "t"): KtVtGeometry,
            ("d", "d"): KdVdGeometry}[layout]


def kernel_operands(layer, geo) -> list[jax.Array]:
    """K words [B, H, Tq/P, P*nw] and its scale / zero in the layout of its grouping
    ("d": [B, H, Tq/P, P*ng]; "t": [B, H, Tq/G, D]), then V words [B, H, Tq/cpw, D] and
    its scale / zero ("t": [B, H, Tq/G, D]; "d": [B, H, Tq, D/G])."""
    k, v = layer.k, layer.v
    if k.packing != "d" or v.packing != "t":
        raise ValueError(f"the fused kernel needs K packed along D and V along T, got "
                         f"{k.packing}/{v.packing}")
    B, H, Tq, _ = k.codes.shape
    if Tq % geo.P:
        raise ValueError(f"quant_capacity={Tq} must be a multiple of {geo.P}")
    view = lambda x: x.reshape(B, H, Tq // geo.P, -1)  # noqa: E731
    ks, kz = (view(k.scale), view(k.zero)) if k.grouping == "d" else (k.scale, k.zero)
    so = ib.scale_operand  # fp8 scales travel as their bits
    return [view(k.codes), so(ks), so(kz), v.codes, so(v.scale), so(v.zero)]


def mixed_part(layout):
    """The quantized-region part (same signature as ``outerq_part``) for a mixed layout."""

    def part(q_ref, refs, nq, start, chunk, geo):
        kw_ref, ks_ref, kz_ref, vw_ref, vs_ref, vz_ref = refs
        if layout[0] == "t":
            qtiles, chans, gt, qt = ob._query_tiles(q_ref, geo)

            def scores(base):
                kw = ib.load_key_words(kw_ref, base, nq, geo)
                return ob.block_key_scores(kw, ks_ref, kz_ref, base, nq, qtiles, chans, gt, qt,
                                           geo)
        else:
            qexp, koff, qsum_cols = ib.expanded_query(q_ref, geo)

            def scores(base):
                kw, ks, kz = ib.load_key_block(kw_ref, ks_ref, kz_ref, base, nq, geo)
                return ib.block_key_scores(kw, ks, kz, qexp, koff, qsum_cols, geo)

        if layout[1] == "t":
            def values(base, p):
                pexp, psum, poff = ib.value_operands(p, geo)
                vwt, vst, vzt = ib.load_value_block(vw_ref, vs_ref, vz_ref, base, nq, geo)
                return ib.block_value_sum(vwt, vst, vzt, pexp, psum, poff, geo)
        else:
            def values(base, p):
                vwt, vs, vz = ob._load_value_block(vw_ref, vs_ref, vz_ref, base, nq, geo)
                return ob.block_value_sum(vwt, vs, vz, p, geo)

        return ib.online_softmax_loop(start, nq, chunk, geo, scores, values)

    return part


__all__ = ["LAYOUTS", "geometry_class", "kernel_operands", "mixed_part"]
