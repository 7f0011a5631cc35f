"""A drop-in causal self-attention layer built on stick-breaking attention, and the key/value cache it decodes
with."""
from dataclasses import dataclass

import torch
from torch import nn

from .attention import stick_breaking_attention
from .distributed import context_parallel_attention
from .decode import stick_breaking_decode
from .validation import check_backend

REMAINDER_MODES = ("self", "bias", "none")


@dataclass
class KVCache:
    """Preallocated keys and values of one attention layer for generation: ``k`` (B, Hk, Tmax, head_dim), ``v``
    (B, Hk, Tmax, head_dim) and ``seqlens`` (B,) int64, the valid positions of each sequence (the rest is unused).
    ``StickBreakingSelfAttention.forward(x, cache=cache)`` appends the new tokens' keys and values and advances
    ``seqlens``; sequences may have different lengths (e.g. prompts of different lengths, written by hand).

    Example:
        >>> import torch, sb_ref
        >>> layer = sb_ref.StickBreakingSelfAttention(32, num_heads=4, num_kv_heads=2)
        >>> cache = sb_ref.KVCache.empty(2, 2, 100, 8)
        >>> with torch.no_grad():
        ...     y = layer(torch.randn(2, 5, 32), cache=cache)    # a prompt of 5 tokens
        ...     y = layer(torch.randn(2, 1, 32), cache=cache)    # then one token at a time
        >>> cache.seqlens.tolist()
        [6, 6]
    """
    k: torch.Tensor
    v: torch.Tensor
    seqlens: torch.Tensor

    @classmethod
    def empty(cls, batch_size, num_kv_heads, max_len, head_dim, *, dtype=torch.float32, device=None):
        """An empty cache with room for max_len positions per sequence."""
        k = torch.zeros(batch_size, num_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        return cls(k, torch.zeros_like(k), torch.zeros(batch_size, dtype=torch.int64, device=device))

    @property
    def max_len(self):
        return self.k.shape[2]

    def append(self, k, v):
        """Writes k, v (B, Hk, Tn, head_dim) at positions seqlens[b] .. seqlens[b] + Tn - 1 of each sequence and
        advances seqlens by Tn."""
        B, Hk, Tn, _ = k.shape
        if (B, Hk) != tuple(self.k.shape[:2]) or k.shape[-1] != self.k.shape[-1] or v.shape != k.shape:
            raise ValueError(f"the cache holds (B, Hk, Tmax, head_dim) = {tuple(self.k.shape)}, got new keys "
                             f"{tuple(k.shape)} and values {tuple(v.shape)}")
        if int(self.seqlens.max()) + Tn > self.max_len:
            raise ValueError(f"the cache is full: {Tn} new tokens do not fit after seqlens = "
                             f"{self.seqlens.tolist()} in Tmax = {self.max_len} positions")
        pos = self.seqlens[:, None] + torch.arange(Tn, device=self.seqlens.device)  # (B, Tn)
        i_b = torch.arange(B, device=pos.device)[:, None, None]
        i_h = torch.arange(Hk, device=pos.device)[None, :, None]
        self.k[i_b, i_h, pos[:, None, :]] = k.detach().to(self.k.dtype)
        self.v[i_b, i_h, pos[:, None, :]] = v.detach().to(self.v.dtype)
        self.seqlens += Tn


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
    across a sequence boundary. With ``cp_group`` (a torch.distributed group), ``x`` is this rank's part of one
    sequence (``sb_ref.distributed.shard_sequence(x, cp_group, cp_layout, dim=1)``) and attention runs over the
    whole sequence through :func:`sb_ref.distributed.context_parallel_attention`.

    Generation: with ``cache`` (a :class:`KVCache` from :meth:`new_cache`), ``x`` holds the next Tn tokens of
    each sequence; their keys and values are appended to the cache and their queries attend to everything the
    cache holds through :func:`sb_ref.stick_breaking_decode`. Token by token (or in chunks) this gives the same
    outputs as the full sequence at once. Inference only (no gradient flows through the cache); call it under
    ``torch.no_grad()``.

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
        check_backend(backend)
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.remainder, self.attend_current, self.backend = remainder, attend_current, backend
        self.q_proj = nn.Linear(embed_dim, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(num_heads * self.head_dim, embed_dim, bias=bias)
        self.remainder_bias = nn.Parameter(torch.zeros(num_heads, self.head_dim)) if remainder == "bias" else None

    def new_cache(self, batch_size, max_len, *, dtype=None, device=None):
        """An empty :class:`KVCache` for this layer (default: the dtype and device of its weights)."""
        w = self.k_proj.weight
        return KVCache.empty(batch_size, self.num_kv_heads, max_len, self.head_dim,
                             dtype=w.dtype if dtype is None else dtype, device=w.device if device is None else device)

    def forward(self, x, cu_seqlens=None, cache=None, cp_group=None, cp_layout="zigzag"):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a tensor (B, T, {self.embed_dim}), got {shape}")
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be an sb_ref.KVCache or None, got {type(cache).__name__}")
        if cache is not None and cu_seqlens is not None:
            raise ValueError("cu_seqlens and cache cannot be combined: a cache holds one sequence per batch row")
        if cp_group is not None and (cache is not None or cu_seqlens is not None):
            raise ValueError("cp_group (a sequence split over ranks) cannot be combined with cu_seqlens or cache")
        B, T, _ = x.shape
        Hq, Hk, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, Hq, Dh).transpose(1, 2)
        k = self.k_proj(x).view(B, T, Hk, Dh).transpose(1, 2)
        v = self.v_proj(x).view(B, T, Hk, Dh).transpose(1, 2)
        if cp_group is not None:
            o, rem = context_parallel_attention(q, k, v, group=cp_group, layout=cp_layout,
                                                attend_current=self.attend_current, return_remainder=True,
                                                backend=self.backend)
        elif cache is None:
            o, rem = stick_breaking_attention(q, k, v, attend_current=self.attend_current, cu_seqlens=cu_seqlens,
                                              return_remainder=True, backend=self.backend)
        else:
            cache.append(k, v)
            o, rem = stick_breaking_decode(q.to(cache.k.dtype), cache.k, cache.v, cache.seqlens,
                                           attend_current=self.attend_current, return_remainder=True,
                                           backend=self.backend)
            o = o.to(q.dtype)
        rem = rem.to(o.dtype).unsqueeze(-1)
        if self.remainder == "self":  # each query head takes its own position's value from its kv head
            o = (o.view(B, Hk, Hq // Hk, T, Dh) + rem.view(B, Hk, Hq // Hk, T, 1) * v.unsqueeze(2)).view(o.shape)
        elif self.remainder == "bias":
            o = o + rem * self.remainder_bias.to(o.dtype)[None, :, None, :]
        return self.out_proj(o.transpose(1, 2).reshape(B, T, Hq * Dh))

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"remainder={self.remainder!r}, attend_current={self.attend_current}, backend={self.backend!r}")
