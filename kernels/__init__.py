"""Triton kernels behind sb_ref (installed as ``sb_ref.kernels``): stick-breaking attention, forward and backward,
and split-K decoding against a key/value cache."""
from .attention import stick_breaking_attention_triton
from .decode import stick_breaking_decode_triton

__all__ = ["stick_breaking_attention_triton", "stick_breaking_decode_triton"]
