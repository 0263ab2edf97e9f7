"""Pallas (Triton backend) kernels for decode attention over the quantized KV cache.

Public entry point: :func:`pallas_kernels.decode.quantized_decode_attention`
(kernel (c), fused flash-decoding). Kernels (a) and (b), the InnerQ key scores
and value sum alone, live in :mod:`pallas_kernels.key_scores` and
:mod:`pallas_kernels.value_sum`.
"""

from pallas_kernels.decode import quantized_decode_attention

__all__ = ["quantized_decode_attention"]
