"""Triton kernels behind sb_ref (installed as ``sb_ref.kernels``): stick-breaking attention, forward and backward."""
from .attention import stick_breaking_attention_triton

__all__ = ["stick_breaking_attention_triton"]
