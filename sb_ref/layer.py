"""A drop-in causal self-attention layer built on stick-breaking attention."""
import torch
from torch import nn

from .attention import BACKENDS, stick_breaking_attention

REMAINDER_MODES = ("self", "bias", "none")


class StickBreakingSelfAttention(nn.Module):
    """Multi-head causal self-attention with stick-breaking weights and no positional encoding.

    Stick-breaking weights of a query sum to ``1 - rem`` rather than 1; ``remainder`` says what the unused
    stick ``rem`` (per query and head) buys:

    - ``"self"``: ``rem_i * v_i``, the query position's own value (as in the stick-breaking paper's models);
    - ``"bias"``: ``rem_i * b_h``, a learned vector per head (zero at initialisation);
    - ``"none"``: nothing: the unused stick is dropped.

    Args:
        embed_dim: model width E; must be divisible by ``num_heads``. Head dim is ``E // num_heads``.
        num_heads: query heads Hq.
        num_kv_heads: key/value heads Hk (grouped-query attention); default ``num_heads``; must divide it.
        bias: whether the q, k, v and output projections have biases.
        remainder: "self", "bias" or "none" (above).
        attend_current: whether a token attends to itself through the stick (rather than via the remainder).
        backend: passed to :func:`sb_ref.stick_breaking_attention`.

    Shapes: ``x`` (B, T, E) -> (B, T, E). With ``cu_seqlens`` (packed sequences, B == 1) no token attends
    across a sequence boundary.

    Example:
        >>> import torch, sb_ref
        >>> layer = sb_ref.StickBreakingSelfAttention(64, num_heads=4, num_kv_heads=2)
        >>> layer(torch.randn(2, 10, 64)).shape
        torch.Size([2, 10, 64])
    """

    def __init__(self, embed_dim, num_heads, *, num_kv_heads=None, bias=False, remainder="self",
                 attend_current=False, backend="auto"):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if remainder not in REMAINDER_MODES:
            raise ValueError(f"remainder must be one of {REMAINDER_MODES}, got {remainder!r}")
        if not isinstance(attend_current, bool):
            raise TypeError(f"attend_current must be a bool, got {type(attend_current).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.remainder, self.attend_current, self.backend = remainder, attend_current, backend
        self.q_proj = nn.Linear(embed_dim, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(num_heads * self.head_dim, embed_dim, bias=bias)
        self.remainder_bias = nn.Parameter(torch.zeros(num_heads, self.head_dim)) if remainder == "bias" else None

    def forward(self, x, cu_seqlens=None):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a tensor (B, T, {self.embed_dim}), got {shape}")
        B, T, _ = x.shape
        Hq, Hk, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, Hq, Dh).transpose(1, 2)
        k = self.k_proj(x).view(B, T, Hk, Dh).transpose(1, 2)
        v = self.v_proj(x).view(B, T, Hk, Dh).transpose(1, 2)
        o, rem = stick_breaking_attention(q, k, v, attend_current=self.attend_current, cu_seqlens=cu_seqlens,
                                          return_remainder=True, backend=self.backend)
        rem = rem.to(o.dtype).unsqueeze(-1)
        if self.remainder == "self":  # each query head takes its own position's value from its kv head
            o = (o.view(B, Hk, Hq // Hk, T, Dh) + rem.view(B, Hk, Hq // Hk, T, 1) * v.unsqueeze(2)).view(o.shape)
        elif self.remainder == "bias":
            o = o + rem * self.remainder_bias.to(o.dtype)[None, :, None, :]
        return self.out_proj(o.transpose(1, 2).reshape(B, T, Hq * Dh))

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"remainder={self.remainder!r}, attend_current={self.attend_current}, backend={self.backend!r}")
