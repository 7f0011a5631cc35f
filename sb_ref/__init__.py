"""sb_ref: stick-breaking attention (Tan et al., 2024), exact and fast.

- :func:`stick_breaking_attention`: the op (Triton on CUDA, tiled PyTorch elsewhere), differentiable.
- :func:`stick_breaking_weights`: the stable weight matrix of a logits matrix, for teaching and checks.
- :func:`stick_breaking_decode`: a few new queries against a key/value cache (generation), split-K on CUDA.
- :class:`StickBreakingSelfAttention`: a causal self-attention layer with no positional encoding; :class:`KVCache`
  for generating with it.
- :mod:`sb_ref.naive`: the definition as numpy loops. :mod:`sb_ref.testing`: oracle, regimes, probes, and the
  course's checks (loaded on first use of ``sb_ref.testing``, not by ``import sb_ref``).
"""
import importlib

from . import naive
from .attention import stick_breaking_attention
from .decode import stick_breaking_decode
from .layer import KVCache, StickBreakingSelfAttention
from .weights import stick_breaking_weights

__all__ = ["stick_breaking_attention", "stick_breaking_decode", "stick_breaking_weights", "StickBreakingSelfAttention",
           "KVCache", "naive", "testing"]
__version__ = "0.1.0"


def __getattr__(name):
    """``sb_ref.testing`` is imported on first access, so that ``import sb_ref`` loads the library only."""
    if name == "testing":
        return importlib.import_module(f"{__name__}.testing")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
