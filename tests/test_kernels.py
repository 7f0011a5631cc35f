"""The Triton kernels (sb_ref.kernels) against the float64 oracle, on the CPU through Triton's interpreter.

conftest.py switches the interpreter on when there is no GPU; on a GPU the same tests run compiled. Sizes stay
small (T up to a few hundred) so that the whole file runs in well under three minutes on two cores.
"""
import dataclasses
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from reference import attention, rel_err
import triton
import triton.language as tl

from sb_ref.kernels import LaunchConfig, op, operands, tile_math
from sb_ref.kernels import stick_breaking_attention_triton
from sb_ref.kernels.config import INTERPRETER, Problem
from sb_ref.testing.speed import key_elements_loaded

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (output and remainder, gradients): DESIGN.md's bounds
TOL = {torch.float32: (1e-5, 3e-5), torch.bfloat16: (2.5e-3, 3e-3), torch.float16: (2.5e-3, 3e-3)}


@triton.jit
def _log2_1p_kernel(E, OUT, N, SHORT: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    tl.store(OUT + o, -tile_math.neg_log2_1p(tl.load(E + o, mask=m, other=0.0), SHORT), mask=m)


@pytest.mark.parametrize("short,bound", [(False, 2e-7), (True, 1e-5)])
def test_log1p_polynomial_is_relatively_accurate_down_to_tiny_e(short, bound):
    # log2(1 + e) for e = exp(-|logit|) in (0, 1]: the long regime needs a relative error, not an absolute one
    g = torch.Generator().manual_seed(0)
    e = torch.cat([torch.exp2(-torch.linspace(0, 60, 6001)), torch.rand(4000, generator=g)]).float().to(DEVICE)
    out = torch.empty_like(e)
    _log2_1p_kernel[(triton.cdiv(e.numel(), 1024),)](e, out, e.numel(), SHORT=short, BLOCK=1024)
    exact = torch.log1p(e.double()) / math.log(2)
    assert ((out.double() - exact).abs() / exact).max().item() <= bound


def make_inputs(regime, B, Hq, Hk, T, D, Dv, dtype, seed=0, scale=None):
    """q, k, v in `dtype` (on DEVICE, requiring grad) for one input regime, and the logit scale."""
    g = torch.Generator().manual_seed(seed)
    scale = D ** -0.5 if scale is None else scale
    q = torch.randn(B, Hq, T, D, generator=g)
    k = torch.randn(B, Hk, T, D, generator=g)
    v = torch.randn(B, Hk, T, Dv, generator=g)
    if regime == "long":
        # logits near -8 (+- ~0.2): q and k share one direction with opposite signs, plus a little noise
        u = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)
        a = math.sqrt(8.0 / scale)
        q = a * u + 0.02 * q
        k = -a * u + 0.02 * k
    elif regime == "saturated":
        # logits ~ N(0, 15^2): many of magnitude 20 to 50
        c = math.sqrt(15.0 / (scale * math.sqrt(D)))
        q, k = c * q, c * k
    q, k, v = (x.to(dtype).to(DEVICE).requires_grad_() for x in (q, k, v))
    return q, k, v, scale


def run_and_check(q, k, v, scale, attend_current, cu_seqlens=None, seed=1, check_grads=True, label="",
                  grad_scale=1.0, config=LaunchConfig()):
    """Forward and backward (through o and rem) against the oracle on the same rounded inputs; returns errors.
    The output gradients are N(0, grad_scale^2)."""
    g = torch.Generator().manual_seed(seed)
    q.grad = k.grad = v.grad = None
    o, rem = stick_breaking_attention_triton(q, k, v, scale, attend_current, cu_seqlens, config=config)
    assert o.dtype == q.dtype and o.shape == (*q.shape[:-1], v.shape[-1])
    assert rem.dtype == torch.float32 and rem.shape == q.shape[:-1]
    go = (grad_scale * torch.randn(o.shape, generator=g)).to(q.dtype).to(q.device)
    grem = (grad_scale * torch.randn(rem.shape, generator=g)).to(q.device)
    qd, kd, vd = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    cu = None if cu_seqlens is None else cu_seqlens.cpu()
    ro, rr = attention(qd, kd, vd, scale, attend_current, cu)
    tol_o, tol_g = TOL[q.dtype]
    errs = {"o": rel_err(o.cpu(), ro), "rem": rel_err(rem.cpu(), rr)}
    if check_grads:
        ((o.float() * go.float()).sum() + (rem * grem).sum()).backward()
        ((ro * go.cpu().double()).sum() + (rr * grem.cpu().double()).sum()).backward()
        for name, x, xd in (("dq", q, qd), ("dk", k, kd), ("dv", v, vd)):
            assert x.grad.dtype == x.dtype and x.grad.shape == x.shape
            errs[name] = rel_err(x.grad.cpu(), xd.grad)
    for name, err in errs.items():
        tol = tol_o if name in ("o", "rem") else tol_g
        assert err <= tol, f"{label} {name}: relative error {err:.3e} > {tol:.1e} ({errs})"
    return errs


@pytest.mark.parametrize("regime", ["random", "long", "saturated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("attend_current", [False, True])
def test_regimes(regime, dtype, attend_current):
    # a length that is no multiple of any block, a non-power-of-two head dim, GQA and Dv != D in one go
    q, k, v, scale = make_inputs(regime, 1, 4, 2, 157, 48, 32, dtype, seed=hash((regime, attend_current)) % 1000)
    run_and_check(q, k, v, scale, attend_current, label=f"{regime} {dtype}")


@pytest.mark.parametrize("v_scale,grad_scale", [(1e-6, 1e-6), (1e5, 1e4)])
def test_bfloat16_far_outside_float16_range(v_scale, grad_scale):
    # the products take float16 copies of bfloat16 v and dO, scaled per head to fit float16, and dz scaled to fit
    q, k, v, scale = make_inputs("random", 1, 4, 2, 96, 64, 64, torch.bfloat16, seed=7)
    v = (v.detach() * v_scale).requires_grad_()
    run_and_check(q, k, v, scale, False, grad_scale=grad_scale, label=f"v x {v_scale}, dO x {grad_scale}")


@triton.jit
def _pow2_scale_kernel(AMAX, S, N, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(S + o, tile_math.pow2_scale(tl.load(AMAX + o, mask=o < N, other=0.0)), mask=o < N)


def _pow2_scales(amax):
    s = torch.empty_like(amax)
    _pow2_scale_kernel[(triton.cdiv(amax.numel(), 256),)](amax, s, amax.numel(), BLOCK=256)
    return s


def test_pow2_scale_puts_the_largest_magnitude_just_below_float16s_top():
    # the scale of a float16 copy: amax * s in [2^13, 2^14) for every normal amax, a power of two, never inf; 1
    # for 0, inf and NaN
    g = torch.Generator().manual_seed(6)
    amax = torch.exp2(torch.rand(2000, generator=g, dtype=torch.float64) * 250 - 125).float()
    amax = torch.cat([amax, torch.exp2(torch.arange(-126.0, 128.0)), torch.tensor([2.0 ** 14 - 1, 3e38])])
    s = _pow2_scales(amax.to(DEVICE)).cpu().double()
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    top = amax.double() * s
    assert ((top >= 2 ** 13) & (top < 2 ** 14))[amax >= 2.0 ** -114].all()
    assert ((top >= 2 ** 13) & (top < 2 ** 14) | (s == 2.0 ** 127)).all()
    special = torch.tensor([0.0, float("inf"), float("nan"), 1e-40], device=DEVICE)
    assert _pow2_scales(special).tolist() == [1.0, 1.0, 1.0, 2.0 ** 127]


def test_float16_copies_keep_every_bfloat16_bit():
    # the operands of the 16-bit products: bfloat16 scaled by a power of two per (batch, kv-head), as float16;
    # the q-heads of a GQA group (here 2 per kv-head) share one scale
    g = torch.Generator().manual_seed(4)
    spread = torch.exp2(torch.randint(-16, 16, (2, 4, 64, 32), generator=g).float())
    x = (torch.randn(2, 4, 64, 32, generator=g) * spread).to(torch.bfloat16).to(DEVICE)
    s = _pow2_scales(operands.group_amax(x, 2))
    assert s.shape == (2, 2) and torch.all(torch.log2(s) == torch.round(torch.log2(s)))
    back = operands.scaled_f16(x, s).double() / s.double().repeat_interleave(2, 1)[:, :, None, None]
    amax = operands.group_amax(x, 2).double().repeat_interleave(2, 1)[:, :, None, None]
    normal = x.double().abs() >= amax * 2.0 ** -27
    assert 0.5 < normal.float().mean() < 1  # most values, and some below float16's normal range
    assert torch.equal(back[normal], x.double()[normal])
    assert ((back - x.double()).abs() <= amax * 2.0 ** -37).all()
    # any strides in, the same copy out
    assert torch.equal(operands.scaled_f16(x.transpose(2, 3).contiguous().transpose(2, 3), s), operands.scaled_f16(x, s))


@pytest.mark.parametrize("regime", ["random", "saturated"])
def test_bfloat16_split_products(regime):
    # the alternative to the forward's float16 product: A as a bfloat16 hi + lo pair
    q, k, v, scale = make_inputs(regime, 1, 2, 1, 100, 48, 48, torch.bfloat16, seed=5)
    run_and_check(q, k, v, scale, True, label=f"split {regime}", config=LaunchConfig(f16_products=False))


@pytest.mark.parametrize("D,Dv", [(16, 16), (64, 64), (64, 16), (16, 80)])
def test_head_dims(D, Dv):
    q, k, v, scale = make_inputs("random", 2, 2, 2, 70, D, Dv, torch.bfloat16, seed=D + Dv)
    run_and_check(q, k, v, scale, False, label=f"D={D} Dv={Dv}")


def test_long_sequence_float32():
    # several backward chunks (the interpreter's chunk is 32 keys) and a stick that outlasts the sequence
    q, k, v, scale = make_inputs("long", 1, 1, 1, 300, 16, 16, torch.float32, seed=3)
    run_and_check(q, k, v, scale, False)


def test_scale_given_and_gqa4():
    q, k, v, scale = make_inputs("random", 1, 4, 1, 90, 16, 24, torch.float32, seed=4, scale=0.37)
    run_and_check(q, k, v, scale, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen(dtype):
    # an empty sequence, two of length 1, and lengths that are no block multiple; nothing crosses a boundary
    lens = [5, 0, 1, 40, 1, 77, 33]
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    T = sum(lens)
    q, k, v, scale = make_inputs("random", 1, 2, 1, T, 16, 16, dtype, seed=5)
    run_and_check(q, k, v, scale, False, cu_seqlens=cu)
    run_and_check(q, k, v, scale, True, cu_seqlens=cu.long())


def test_varlen_equals_separate_calls():
    lens = [17, 1, 50]
    cu = torch.tensor([0, 17, 18, 68], device=DEVICE)
    q, k, v, scale = make_inputs("random", 1, 2, 2, 68, 16, 16, torch.float32, seed=6)
    o, rem = stick_breaking_attention_triton(q, k, v, scale, False, cu)
    start = 0
    for n in lens:
        s = slice(start, start + n)
        o1, rem1 = stick_breaking_attention_triton(q[:, :, s], k[:, :, s], v[:, :, s], scale, False)
        torch.testing.assert_close(o[:, :, s], o1, rtol=0, atol=1e-6)
        torch.testing.assert_close(rem[:, :, s], rem1, rtol=0, atol=1e-6)
        start += n


@pytest.mark.parametrize("attend_current", [False, True])
def test_length_one(attend_current):
    q, k, v, scale = make_inputs("random", 2, 2, 1, 1, 16, 16, torch.float32, seed=7)
    errs = run_and_check(q, k, v, scale, attend_current)
    if not attend_current:
        # query 0 sees nothing: o = 0, rem = 1
        o, rem = stick_breaking_attention_triton(q, k, v, scale, False)
        assert torch.all(o == 0) and torch.all(rem == 1)
    assert all(math.isfinite(e) for e in errs.values())


def test_any_strides():
    # (B, T, H, D) memory viewed as (B, H, T, D), and v sliced out of a wider tensor
    g = torch.Generator().manual_seed(8)
    qt = torch.randn(2, 60, 4, 16, generator=g).to(DEVICE)
    kt = torch.randn(2, 60, 2, 16, generator=g).to(DEVICE)
    vw = torch.randn(2, 2, 60, 40, generator=g).to(DEVICE)
    q = qt.transpose(1, 2).requires_grad_()
    k = kt.transpose(1, 2).requires_grad_()
    v = vw[..., 8:32].detach().requires_grad_()
    assert not q.is_contiguous() and not v.is_contiguous()
    run_and_check(q, k, v, 0.25, False)


def test_deterministic_backward():
    q, k, v, scale = make_inputs("random", 1, 4, 2, 130, 16, 16, torch.bfloat16, seed=9)
    grads = []
    for _ in range(2):
        o, rem = stick_breaking_attention_triton(q, k, v, scale, False)
        g = torch.Generator().manual_seed(10)
        go = torch.randn(o.shape, generator=g).to(o.dtype).to(o.device)
        q.grad = k.grad = v.grad = None
        ((o * go).sum() + rem.sum()).backward()
        grads.append([x.grad.clone() for x in (q, k, v)])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def _outputs_and_grads(q, k, v, scale, attend_current, cu_seqlens=None, config=LaunchConfig()):
    o, rem = stick_breaking_attention_triton(q, k, v, scale, attend_current, cu_seqlens, config=config)
    g = torch.Generator().manual_seed(11)
    go = torch.randn(o.shape, generator=g).to(o.dtype).to(o.device)
    grem = torch.randn(rem.shape, generator=g).to(rem.device)
    q.grad = k.grad = v.grad = None
    ((o * go).sum() + (rem * grem).sum()).backward()
    return [o.detach(), rem.detach()] + [x.grad.clone() for x in (q, k, v)]


def _loads_per_kernel(q, k, v, scale, attend_current, cu, config):
    """Elements each kernel, launched on its own, loads from the tensor its walk steps through (under the
    interpreter, sb_ref.testing's counter): the forward and the query-major kernel from k, the key-major one from q
    (the operands the backward reads, float16 copies for bfloat16 inputs)."""
    p = Problem.of(q, k, v, cu, op.max_seqlen_of(q.shape[2], cu), config)
    # each kernel runs once, counted; its outputs feed the next
    out = {}
    loads = {"forward": key_elements_loaded(
        lambda k: out.update(fwd=op.forward(p, q, k, v, scale, attend_current)), (k,), key_index=0)}
    o, rem, lo = out["fwd"]
    drem = torch.ones_like(rem)
    ops = operands.backward_operands(scale, p.DV, torch.ones_like(o), drem * rem, q, k, v)
    q_op, k_op = ops[1], ops[2]
    loads["query-major"] = key_elements_loaded(
        lambda _: out.update(dq=op.backward_dq(p, ops, drem, rem, scale, attend_current)), (k_op,), key_index=0)
    _, delta_g, tw, tr, chunk = out["dq"]
    kept_lo = lo if p.walks_can_stop(lo) else None
    loads["key-major"] = key_elements_loaded(
        lambda _: op.backward_dkdv(p, ops, kept_lo, delta_g, tw, tr, chunk, scale, attend_current), (q_op,),
        key_index=0)
    return loads


def _forward(q, k, v, scale, attend_current, cu, max_len, config):
    return op.forward(Problem.of(q, k, v, cu, max_len, config), q, k, v, scale, attend_current)


# Early exit checks a block's sticks once, when its walk is exit_segment key blocks past the diagonal, so walks can
# stop only in sequences longer than block_m + exit_segment * block_n (64 + 6 * 32 under the interpreter), and only
# where the sticks are used up within that segment. Where they are used up within a few keys (saturated logits, the
# poisoned heads below), a segment of 2 lets sequences of 256 keys stop: same kernels, a smaller constexpr, a third
# of the interpreter's work for 448 keys.
SHORT_SEGMENT = dataclasses.replace(INTERPRETER, exit_segment=2)


def _exit_config(on, interpreter=SHORT_SEGMENT, **options):
    return LaunchConfig(early_exit=on, interpreter=interpreter, **options)


@pytest.mark.parametrize("regime,dtype,attend_current,varlen", [("random", torch.bfloat16, False, False),
                                                                 ("saturated", torch.float32, True, False),
                                                                 ("random", torch.bfloat16, False, True),
                                                                 ("long", torch.bfloat16, False, False)])
def test_early_exit_is_exact_and_skips_used_up_sticks(regime, dtype, attend_current, varlen):
    """Stopping the walks once every row's stick is below 2^-160 changes no bit of o, rem, dq, dk, dv (what it
    skips rounds to 0), and it does stop: the forward and the key-major kernel load less (counted under the
    interpreter). Sticks that last (the long regime) take the forward's one-loop walk: same bits, same loads.
    Packed batches take it only with early_exit_varlen as well (off by default: they walk everything)."""
    # N(0, 1) logits halve a stick per key: about 160 keys use it up, so these take the default segment and 448 keys
    random = regime == "random"
    T, first, target = (448, 300, INTERPRETER) if random else (256, 170, SHORT_SEGMENT)
    q, k, v, scale = make_inputs(regime, 1, 2, 1, T, 16, 16, dtype, seed=12)
    cu = torch.tensor([0, first, T], dtype=torch.int32, device=DEVICE) if varlen else None
    if varlen and DEVICE == "cpu":
        walks = {on: key_elements_loaded(
            lambda k: _forward(q, k, v, scale, attend_current, cu, first, _exit_config(on, target)), (k,), 0)
            for on in (True, False)}
        assert walks[True] == walks[False], "a packed batch should walk everything unless early_exit_varlen"
    results, loads = {}, {}
    for on in (False, True):
        config = _exit_config(on, target, early_exit_varlen=on)
        results[on] = _outputs_and_grads(q, k, v, scale, attend_current, cu, config)
        if DEVICE == "cpu":
            loads[on] = _loads_per_kernel(q, k, v, scale, attend_current, cu, config)
    for name, a, b in zip(("o", "rem", "dq", "dk", "dv"), results[False], results[True]):
        assert torch.equal(a, b), f"{name} changed with early exit: largest difference {(a - b).abs().max():.2e}"
    if regime == "long":
        assert bool((results[True][1] > 0.5).all()), "every stick should last in the long regime"
        # nothing skipped
        assert all(loads[True][k] >= loads[False][k] for k in loads.get(False, {})), loads
        return
    assert bool((results[True][1] == 0).any()), "no row's stick was used up: the test shows nothing"
    if loads:
        # the forward and the key-major backward skip; the query-major backward walks everything (see EXHAUSTED)
        message = f"elements loaded with early exit {loads[True]}, without {loads[False]}"
        assert loads[True]["forward"] < loads[False]["forward"], message
        assert loads[True]["key-major"] < loads[False]["key-major"], message
        assert loads[True]["query-major"] == loads[False]["query-major"], message


@pytest.mark.parametrize("lengths", [[300], [0, 37, 200, 1, 150]])
def test_exit_bounds_count_the_query_blocks_that_reach_each_key_block(lengths):
    """The key-major kernel's loop bounds under early exit, against their definition in plain loops: for each key
    block, the query blocks of its sequence from the first up to the last one whose rows, or a later block's,
    reach back to it (lo <= the key block's last key). lo is random here, not just what a forward would write."""
    block_m, block_n, H = 32, 16, 3
    g = torch.Generator().manual_seed(5)
    T = sum(lengths)
    lo = torch.zeros(1, H, T, dtype=torch.int32)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    for s, n in zip(starts, lengths):
        for r in range(s, s + n):
            lo[0, :, r] = torch.randint(s, r + 1, (H,), generator=g)
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32)
    got = op.exit_bounds(lo.to(DEVICE), cu.to(DEVICE), len(lengths), True, block_m, block_n).cpu()
    for h in range(H):
        for s, n in zip(starts, lengths):
            block_lo = [int(lo[0, h, s + m * block_m:s + min(n, (m + 1) * block_m)].min())
                        for m in range(-(-n // block_m))]
            for j in range(-(-n // block_n)):
                last = s + min(n, (j + 1) * block_n) - 1
                want = max([m + 1 for m in range(len(block_lo)) if min(block_lo[m:]) <= last], default=0)
                assert int(got[0, h, s + j * block_n]) == want, (h, s, j)


@pytest.mark.parametrize("poison", ["nan key", "-inf in a key", "inf value"])
def test_early_exit_walks_on_where_sticks_last_or_inputs_are_not_finite(poison):
    """Early exit changes no bit, and skips nothing it must not: a block with one long-lived row among used-up ones
    walks on, and the key-major kernel then also visits earlier blocks that stopped (it finds their sticks used up
    there); a non-finite key or value poisons every later query as without early exit (NaN in, NaN out, as PyTorch
    attention does: a used-up stick times NaN is NaN; that head's blocks that stopped early walk again, while the
    other head still skips)."""
    T, bad, late = 256, 60, 240
    q, k, v, scale = make_inputs("random", 1, 2, 2, T, 16, 16, torch.float32, seed=13)
    with torch.no_grad():
        if poison == "nan key":
            k[0, 0, bad] = float("nan")
        elif poison == "-inf in a key":
            k[0, 0, bad, 3] = -float("inf")
        else:
            v[0, 0, bad, 5] = float("inf")
        # head 1: logits near +4 (sticks used up within tens of keys) but for row `late`, near -10 against every
        # earlier key: its stick outlives everyone's, so the key-major kernel visits blocks whose walks stopped early
        k[0, 1, :late, 0] = 4.0
        q[0, 1, :, 0] = 4.0
        q[0, 1, late] = 0.0
        q[0, 1, late, 0] = -10.0
    results = {}
    for on in (False, True):
        results[on] = _outputs_and_grads(q, k, v, scale, False, config=_exit_config(on))
    for name, a, b in zip(("o", "rem", "dq", "dk", "dv"), results[False], results[True]):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), f"{name} changed with early exit"
    # the first key each row's walk reached: 0 throughout the poisoned head, later ones in the other
    lo = _forward(q, k, v, scale, False, None, T, _exit_config(True))[2]
    if poison != "-inf in a key":
        assert bool((lo[0, 0] == 0).all()), "the poisoned head's blocks should all have walked to the start"
    assert bool((lo[0, 1] > 0).any()), "head 1's blocks should still stop early"
    o, rem = results[True][:2]
    if poison != "inf value":
        # (an infinite value reaches earlier rows of its own block too: 0 * inf in the product A v, as in PyTorch's)
        assert bool(torch.isfinite(o[0, 0, :bad + 1]).all())
    if poison != "-inf in a key":
        # every later row, even those whose sticks were used up long before the bad key
        assert bool((~torch.isfinite(o[0, 0, bad + 1:])).any(dim=-1).all()), "a non-finite input should reach them all"
    assert float(rem[0, 1, late]) > 0.5, f"row {late}'s stick should outlive everyone's"
    assert bool((rem[0, 1, 64:] == 0).float().mean() > 0.9), "the other sticks should be used up"


def test_early_exit_passes_a_nan_output_gradient_to_every_key_it_reaches():
    """The backward walks everything where dO holds a NaN: without early exit it reaches dv of every key row 230
    sees, so with it too (the backward's table flags non-finite gradients)."""
    T, row = 256, 230
    q, k, v, scale = make_inputs("random", 1, 1, 1, T, 16, 16, torch.float32, seed=14)
    grads = {}
    for on in (False, True):
        o, rem = stick_breaking_attention_triton(q, k, v, scale, False, config=_exit_config(on))
        go = torch.zeros_like(o)
        go[0, 0, row] = float("nan")
        v.grad = None
        (o * go).sum().backward()
        grads[on] = v.grad
    assert bool((rem[0, 0, 128:] == 0).any()), "no stick was used up: early exit would skip nothing"
    assert torch.isnan(grads[True][0, 0, :row]).all()
    assert torch.equal(grads[False].nan_to_num(7.0), grads[True].nan_to_num(7.0))


def test_nan_in_nan_out():
    q, k, v, scale = make_inputs("random", 1, 1, 1, 40, 16, 16, torch.float32, seed=11)
    with torch.no_grad():
        q[0, 0, 20, 3] = float("nan")
    o, rem = stick_breaking_attention_triton(q, k, v, scale, False)
    assert torch.isnan(o[0, 0, 20]).all() and torch.isnan(rem[0, 0, 20])
    assert torch.isfinite(o[0, 0, :20]).all()


@pytest.mark.parametrize("dtype,drem_scale", [(torch.float32, 1.0), (torch.bfloat16, 1.0), (torch.bfloat16, 1e6)])
def test_gradient_only_through_remainder(dtype, drem_scale):
    # o unused: the custom op's backward receives no dO, so in 16 bits dz's float16 scale comes from g alone
    q, k, v, scale = make_inputs("random", 1, 2, 1, 50, 16, 16, dtype, seed=12)
    _, rem = stick_breaking_attention_triton(q, k, v, scale, True)
    (rem.sum() * drem_scale).backward()
    qd, kd, vd = (x.detach().double().cpu().requires_grad_() for x in (q, k, v))
    (attention(qd, kd, vd, scale, True)[1].sum() * drem_scale).backward()
    tol = TOL[dtype][1]
    assert rel_err(q.grad.cpu(), qd.grad) <= tol and rel_err(k.grad.cpu(), kd.grad) <= tol
    assert torch.all(v.grad == 0)


class _LargestAllocation(TorchDispatchMode):
    """Records the largest number of elements of any tensor that an operator returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_T_by_T_allocation():
    T = 640
    q, k, v, scale = make_inputs("random", 1, 1, 1, T, 16, 16, torch.bfloat16, seed=13)
    with _LargestAllocation() as probe:
        o, rem = stick_breaking_attention_triton(q, k, v, scale, False)
        ((o.float() ** 2).sum() + rem.sum()).backward()
    assert probe.largest < T * T // 8, f"largest tensor has {probe.largest} elements (T*T = {T * T})"


def test_opcheck():
    # schema, fake tensors, autograd registration: what torch.compile relies on
    q, k, v, scale = make_inputs("random", 1, 2, 1, 20, 16, 16, torch.float32, seed=14)
    args = (q, k, v, scale, False, None, 20, LaunchConfig().key)
    torch.library.opcheck(torch.ops.sb_ref.stick_breaking_triton_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
