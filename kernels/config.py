"""What a launch is: the launch configuration (tiles, early exit, product precision), frozen and passed in, and
the problem (shapes, dtypes, where it runs) that the op works out once per call.

    from sb_ref.kernels import LaunchConfig, stick_breaking_attention_triton
    config = LaunchConfig(early_exit=False)                    # or LaunchConfig().with_tile(128, "fwd", Tile(...))
    o, rem = stick_breaking_attention_triton(q, k, v, scale, False, config=config)

Tile shapes were measured on an H100 with benchmarks/bench_attention.py --sweep (benchmarks/results/): the
elementwise work is register-hungry, so small tiles win. Every kernel's tile is [queries, keys]; the tensor cores'
fast (wgmma) path wants 64 rows per warpgroup, so BLOCK_M is 64 per 4 warps. The interpreter takes small mixed
shapes (BLOCK_N != BLOCK_M exercises every diagonal case).
"""
import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from .tile_math import INTERPRET, TL_DTYPE

KERNELS = ("fwd", "dq", "dkdv")


@dataclass(frozen=True)
class Tile:
    """One kernel's tile and launch options. The scans are tile_math.exclusive_cumsum's PARTS: of log(1 - beta)
    (scan_l) and of dl (scan_dl, backward only); float32 inputs always take the exact scan (0). maxnreg caps the
    registers per thread (ptxas), None leaves it to the compiler."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    scan_l: int = 2
    scan_dl: int = 1
    maxnreg: Optional[int] = None

    def launch_options(self):
        options = dict(num_warps=self.num_warps, num_stages=self.num_stages)
        if self.maxnreg is not None:
            options["maxnreg"] = self.maxnreg
        return options

    def exact_scans(self):
        return dataclasses.replace(self, scan_l=0, scan_dl=0)


@dataclass(frozen=True)
class KernelTiles:
    """The tiles of the forward and of the two backward kernels."""
    fwd: Tile
    dq: Tile
    dkdv: Tile


@dataclass(frozen=True)
class TargetConfig:
    """Settings of one place the kernels run (a GPU, or Triton's interpreter on the CPU).

    by_head_dim: tiles for 16-bit inputs per padded head dim (64, 128, 256; smaller dims take 64's, larger 256's);
    float32: tiles for float32 inputs (their scans are exact whatever the tile says); exit_segment: key blocks the
    early-exit forward walks past the diagonal before it checks; min_chunk: the smallest chunk of keys of the
    backward's carry table."""
    by_head_dim: tuple
    float32: KernelTiles
    exit_segment: int
    min_chunk: int

    def tiles(self, block_d, dtype):
        if dtype == torch.float32:
            return self.float32
        return dict(self.by_head_dim)[min(256, max(64, block_d))]


def _same_tiles(tiles):
    return tuple((d, tiles) for d in (64, 128, 256))


GPU = TargetConfig(
    by_head_dim=((64, KernelTiles(fwd=Tile(64, 32, 4, 4, maxnreg=168), dq=Tile(64, 32, 4, 3), dkdv=Tile(64, 32, 4, 3))),
                 (128, KernelTiles(fwd=Tile(64, 32, 4, 3, maxnreg=168), dq=Tile(64, 32, 4, 3), dkdv=Tile(64, 32, 4, 2))),
                 (256, KernelTiles(fwd=Tile(64, 32, 4, 1), dq=Tile(32, 32, 4, 1), dkdv=Tile(32, 32, 4, 1)))),
    float32=KernelTiles(fwd=Tile(64, 32, 4, 1, 0, 0), dq=Tile(32, 32, 4, 1, 0, 0), dkdv=Tile(32, 32, 4, 1, 0, 0)),
    exit_segment=8, min_chunk=128)
_INTERPRET_TILES = KernelTiles(fwd=Tile(64, 32, 4, 1), dq=Tile(32, 64, 4, 1), dkdv=Tile(32, 64, 4, 1))
INTERPRETER = TargetConfig(by_head_dim=_same_tiles(_INTERPRET_TILES), float32=_INTERPRET_TILES,
                           exit_segment=6, min_chunk=64)


@dataclass(frozen=True)
class LaunchConfig:
    """How the attention kernels launch.

    early_exit: stop a query block's walk once its sticks are used up (exact: what it skips rounds to 0);
    early_exit_varlen: packed batches (cu_seqlens) take early exit too (their early-exit forward ran 5% slower
    where sticks last, kernels/README.md); f16_products: 16-bit inputs multiply every computed tile as one float16
    product (bfloat16 operands as float16 copies scaled per kv-head), else the forward's A goes in as a bfloat16
    hi + lo pair; max_chunks: chunks of the backward's carry table per sequence; hopper_dkdv: on a Hopper GPU, dk
    and dv by the Gluon kernel (kernels/hopper_backward.py) where it covers the call."""
    gpu: TargetConfig = GPU
    interpreter: TargetConfig = INTERPRETER
    early_exit: bool = True
    early_exit_varlen: bool = False
    f16_products: bool = True
    max_chunks: int = 32
    hopper_dkdv: bool = False

    def target(self, upcast):
        return self.interpreter if upcast else self.gpu

    def with_tile(self, head_dim, kernel, tile):
        """This configuration with one GPU tile for 16-bit inputs of a padded head dim replaced."""
        by_dim = tuple((d, dataclasses.replace(t, **{kernel: tile}) if d == head_dim else t)
                       for d, t in self.gpu.by_head_dim)
        return dataclasses.replace(self, gpu=dataclasses.replace(self.gpu, by_head_dim=by_dim))

    def exit_rows(self, B, H, T, varlen):
        """The shape of lo, the first key each row's walk reached: (B, H, T) where early exit applies to the
        call, else empty."""
        return (B, H, T) if self.early_exit and (self.early_exit_varlen or not varlen) else (0,)

    @functools.cached_property
    def key(self):
        """The name this configuration travels by through the custom ops, whose schema takes strings, not
        objects: its repr, which a frozen dataclass of numbers and tuples spells out in full (config_of reads it
        back)."""
        key = repr(self)
        _BY_KEY.setdefault(key, self)
        return key


def config_of(key):
    """The LaunchConfig whose key this is (LaunchConfig.key)."""
    return _BY_KEY[key]


_BY_KEY = {}


@dataclass(frozen=True)
class Problem:
    """One call's shapes and numerics, worked out once: q (B, H, T, D), v's head dim DV, the GQA group, the packed
    sequences (n_seq, cu, max_len), padded head dims and how products run."""
    B: int
    H: int
    T: int
    D: int
    DV: int
    group: int
    n_seq: int
    max_len: int
    cu: torch.Tensor
    varlen: bool
    block_d: int
    block_dv: int
    dtype: torch.dtype
    upcast: bool
    precision: str
    config: LaunchConfig

    @classmethod
    def of(cls, q, k, v, cu_seqlens, max_len, config):
        B, H, T, D = q.shape
        DV = v.shape[-1]
        varlen = cu_seqlens is not None
        return cls(B=B, H=H, T=T, D=D, DV=DV, group=H // k.shape[1], max_len=max_len,
                   n_seq=cu_seqlens.numel() - 1 if varlen else 1,
                   cu=cu_seqlens if varlen else q,  # cu is unused without VARLEN
                   varlen=varlen, block_d=max(16, triton.next_power_of_2(D)),
                   block_dv=max(16, triton.next_power_of_2(DV)), dtype=q.dtype,
                   upcast=INTERPRET or q.device.type != "cuda",
                   precision="tf32" if (q.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32) else "ieee",
                   config=config)

    @property
    def target(self):
        return self.config.target(self.upcast)

    def tile(self, kernel):
        tile = getattr(self.target.tiles(max(self.block_d, self.block_dv), self.dtype), kernel)
        return tile.exact_scans() if self.dtype == torch.float32 else tile

    @property
    def f16_products(self):
        return self.dtype != torch.float32 and self.config.f16_products

    def walks_can_stop(self, lo):
        """Whether early exit applies to this call: lo (from the forward) is kept and some walk is longer than the
        forward's first segment. Shorter walks cannot stop early (and ptxas crashed compiling the early-exit
        forward for T = 1, which Triton specializes as a constant)."""
        tile = self.tile("fwd")
        return lo.numel() > 0 and self.max_len > tile.block_m + self.target.exit_segment * tile.block_n

    def chunk_size(self):
        """Keys per chunk of the backward table: a power of two >= the smallest chunk, at most max_chunks."""
        return max(self.target.min_chunk, triton.next_power_of_2(triton.cdiv(max(self.max_len, 1),
                                                                             self.config.max_chunks)))

    def sizes(self, kv_dtype):
        """The arguments every attention kernel takes about the problem's shape and numerics; kv_dtype is the
        dtype of the k and v operands the kernel reads (its products' operand dtype)."""
        return dict(T=self.T, H=self.H, GROUP=self.group, N_SEQ=self.n_seq, D=self.D, DV=self.DV,
                    VARLEN=self.varlen, UPCAST=self.upcast, DOT_DTYPE=TL_DTYPE[kv_dtype], PRECISION=self.precision,
                    BLOCK_D=self.block_d, BLOCK_DV=self.block_dv)


@dataclass(frozen=True)
class DecodeConfig:
    """How the split-K decode kernels launch.

    tiles: (BLOCK_N, num_warps, num_stages) per padded head dim (64, 128, 256) on a GPU, interpreter_tile under the
    interpreter (small blocks, so that small tests cross blocks and splits). D = 128 is from
    benchmarks/bench_decode.py --sweep on an H100 (bf16, B = 1 and 8, caches of 4096 to 131072). A sequence's cache
    splits into pieces of about split_keys[1] keys (long runs of loads keep the cache streaming), but at least one
    program per SM and at most programs_per_sm per SM over the work items, never fewer than split_keys[0] keys per
    piece (a short cache is one split, with no combine), at most max_splits; the interpreter counts 4 SMs and
    splits by interpreter_split_keys. splits, if given, overrides that choice. A tile's rows are the q-heads of a
    GQA group x the new tokens, padded to [min_rows, max_rows]."""
    tiles: tuple = ((64, (64, 4, 3)), (128, (64, 2, 3)), (256, (32, 4, 2)))
    interpreter_tile: tuple = (16, 4, 1)
    programs_per_sm: int = 6
    split_keys: tuple = (256, 4096)
    interpreter_split_keys: tuple = (32, 64)
    max_splits: int = 256
    splits: Optional[int] = None
    min_rows: int = 16
    max_rows: int = 64
    combine_rows: int = 16

    def tile(self, block_d, upcast):
        return self.interpreter_tile if upcast else dict(self.tiles)[min(256, max(64, block_d))]

    def with_tile(self, head_dim, tile):
        return dataclasses.replace(self, tiles=tuple((d, tile if d == head_dim else t) for d, t in self.tiles))
