"""Triton kernels behind sb_ref (installed as ``sb_ref.kernels``): stick-breaking attention, forward and backward,
and split-K decoding against a key/value cache. kernels/README.md says which file holds what."""
from .config import DecodeConfig, KernelTiles, LaunchConfig, Tile
from .decode import stick_breaking_decode_triton
from .op import stick_breaking_attention_triton

__all__ = ["stick_breaking_attention_triton", "stick_breaking_decode_triton", "LaunchConfig", "DecodeConfig",
           "KernelTiles", "Tile"]
