"""sb_ref.stick_breaking_decode (PyTorch path and the split-K Triton kernels) and the layer's cache path.

On the CPU the kernels run through Triton's interpreter (conftest.py) at small sizes; the tests marked `gpu` run
them compiled at cache lengths up to 32768 (skipped without CUDA). Every accuracy check compares against the
float64 oracle on each sequence's valid cache (its last Tn rows), or, where the oracle's T x T matrix is too
large, against `reference_decode`, a float64 log-space computation of the Tn rows alone that is itself checked
against the oracle here.
"""
import pytest
import torch
import torch.nn.functional as F

import sb_ref
from sb_ref.kernels import stick_breaking_decode_triton
from sb_ref.kernels import DecodeConfig
from sb_ref.kernels import decode as KD
from sb_ref.testing import make_inputs, oracle_attention, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2.5e-3, torch.float16: 2.5e-3}
REGIMES = ["random", "long", "saturated"]


def decode_problem(regime, lens, Hq, Hk, Tmax, D, Dv, Tn, dtype, seed=0, device=DEVICE, garbage=True):
    """The full sequences (q, k, v) of make_inputs, the cache (k, v with NaN past each sequence's length) and the
    new tokens' queries (B, Hq, Tn, D): the last Tn positions of each sequence."""
    q, k, v = make_inputs(regime, B=len(lens), Hq=Hq, Hk=Hk, T=Tmax, D=D, Dv=Dv, dtype=dtype, seed=seed)
    k_cache, v_cache = k.clone(), v.clone()
    if garbage:
        for b, L in enumerate(lens):
            k_cache[b, :, L:] = float("nan")
            v_cache[b, :, L:] = float("nan")
    q_new = torch.stack([q[b, :, L - Tn:L] for b, L in enumerate(lens)])
    seqlens = torch.tensor(lens, dtype=torch.int32)
    to = lambda x: x.to(device)  # noqa: E731
    return (q, k, v), (to(q_new), to(k_cache), to(v_cache), to(seqlens))


def oracle_decode(full, lens, Tn, attend_current, scale=None):
    """The oracle on each sequence's valid prefix, last Tn rows: (o, rem) float64 (B, Hq, Tn, .)."""
    q, k, v = full
    outs = [oracle_attention(q[b:b + 1, :, :L], k[b:b + 1, :, :L], v[b:b + 1, :, :L], scale=scale,
                             attend_current=attend_current) for b, L in enumerate(lens)]
    return torch.cat([o[:, :, -Tn:] for o, _ in outs]), torch.cat([r[:, :, -Tn:] for _, r in outs])


def reference_decode(q, k_cache, v_cache, lens, attend_current, scale=None):
    """The Tn rows alone in float64, log space, on the inputs' device, one sequence at a time: O(Tn L) memory."""
    B, Hq, Tn, D = q.shape
    group = Hq // k_cache.shape[1]
    scale = D ** -0.5 if scale is None else scale
    o = torch.zeros(B, Hq, Tn, v_cache.shape[-1], dtype=torch.float64, device=q.device)
    rem = torch.ones(B, Hq, Tn, dtype=torch.float64, device=q.device)
    for b, L in enumerate(lens):
        k = k_cache[b, :, :L].double().repeat_interleave(group, 0)
        v = v_cache[b, :, :L].double().repeat_interleave(group, 0)
        z = scale * q[b].double() @ k.transpose(-1, -2)  # (Hq, Tn, L)
        pos = L - Tn + torch.arange(Tn, device=q.device)[:, None]
        seen = torch.arange(L, device=q.device) <= pos if attend_current else torch.arange(L, device=q.device) < pos
        keep = F.logsigmoid(-z).masked_fill(~seen, 0.0)
        after = keep.flip(-1).cumsum(-1).flip(-1) - keep  # sum over the keys nearer than each key
        A = (F.logsigmoid(z) + after).exp().masked_fill(~seen, 0.0)
        o[b] = A @ v
        rem[b] = keep.sum(-1).exp()
    return o, rem


def check(o, rem, ref_o, ref_rem, dtype, label=""):
    errs = (rel_err(o, ref_o), rel_err(rem, ref_rem))
    assert max(errs) <= TOL[dtype], f"{label}: relative errors (o, rem) = {errs}, bound {TOL[dtype]:.1e}"
    return errs


# ---------------------------------------------------------------------------------------------------------------
# accuracy on the CPU: the torch path (float64) and the kernels through the interpreter
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attend_current", [True, False])
@pytest.mark.parametrize("regime", REGIMES)
def test_torch_path_float64_matches_oracle(regime, attend_current):
    for Tn, lens in ((1, [37, 1, 20]), (3, [37, 3, 20])):
        full, (q, kc, vc, sl) = decode_problem(regime, lens, 4, 2, 40, 48, 32, Tn, torch.float64, device="cpu")
        o, rem = sb_ref.stick_breaking_decode(q, kc, vc, sl, attend_current=attend_current, return_remainder=True,
                                              backend="torch")
        assert o.dtype == rem.dtype == torch.float64 and o.shape == (3, 4, Tn, 32) and rem.shape == (3, 4, Tn)
        ref = oracle_decode(full, lens, Tn, attend_current)
        check(o, rem, *ref, torch.float64, f"{regime} Tn={Tn}")
        # the test's own reference agrees with the oracle, so it can stand in for it at lengths the oracle can't
        check(*reference_decode(q, kc, vc, lens, attend_current), *ref, torch.float64, "reference_decode")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("regime", REGIMES)
def test_kernel_matches_oracle(regime, dtype):
    # ragged lengths (one of exactly Tn), NaN past them, GQA, D = 48 (not a power of two), Dv != D, several
    # splits and several key blocks per split
    for attend_current, Tn, lens in ((True, 3, [70, 3, 41]), (False, 1, [66, 1, 29])):
        full, (q, kc, vc, sl) = decode_problem(regime, lens, 4, 2, 72, 48, 32, Tn, dtype, seed=Tn)
        o, rem = sb_ref.stick_breaking_decode(q, kc, vc, sl, attend_current=attend_current, return_remainder=True,
                                              backend="triton")
        assert o.dtype == dtype and rem.dtype == torch.float32 and o.shape == (3, 4, Tn, 32)
        check(o, rem, *oracle_decode(full, lens, Tn, attend_current), dtype, f"{regime} {dtype} Tn={Tn}")


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_kernel_any_number_of_splits_and_head_dim_64(splits):
    # no GQA and a group of 4 (rows = 4 heads x 2 tokens), D = Dv = 64, a scale of our own, float32
    lens = [50, 2, 33, 64]
    for Hq, Hk in ((2, 2), (8, 2)):
        full, (q, kc, vc, sl) = decode_problem("random", lens, Hq, Hk, 64, 64, 64, 2, torch.float32, seed=splits)
        for attend_current in (True, False):
            config = DecodeConfig(splits=splits)
            o, rem = stick_breaking_decode_triton(q, kc, vc, sl, 0.2, attend_current, config=config)
            ref = oracle_decode(full, lens, 2, attend_current, scale=0.2)
            check(o, rem, *ref, torch.float32, f"{splits} splits, Hq={Hq}, Hk={Hk}")


def test_kernel_many_rows_take_several_row_blocks():
    # 8 q-heads per kv-head x 3 tokens = 24 rows, in tiles of 16 rows: two row blocks per kv-head
    lens = [45, 3]
    full, (q, kc, vc, sl) = decode_problem("long", lens, 8, 1, 48, 16, 16, 3, torch.float32, seed=3)
    o, rem = stick_breaking_decode_triton(q, kc, vc, sl, 0.25, True, config=DecodeConfig(splits=3, max_rows=16))
    check(o, rem, *oracle_decode(full, lens, 3, True), torch.float32, "two row blocks")


def test_kernel_is_deterministic_and_ignores_the_cache_past_each_length():
    lens = [64, 5]
    _, (q, kc, vc, sl) = decode_problem("random", lens, 4, 2, 80, 32, 32, 1, torch.bfloat16, garbage=False)
    o1, r1 = stick_breaking_decode_triton(q, kc, vc, sl, 32 ** -0.5, True, config=DecodeConfig(splits=4))
    for b, L in enumerate(lens):
        kc[b, :, L:] = float("nan")
        vc[b, :, L:] = float("inf")
    o2, r2 = stick_breaking_decode_triton(q, kc, vc, sl, 32 ** -0.5, True, config=DecodeConfig(splits=4))
    assert torch.equal(o1, o2) and torch.equal(r1, r2)
    assert torch.isfinite(o1).all()


def test_auto_backend_and_no_gradient():
    lens = [9, 4]
    _, (q, kc, vc, sl) = decode_problem("random", lens, 2, 2, 12, 8, 8, 2, torch.float32)
    q.requires_grad_()
    o = sb_ref.stick_breaking_decode(q, kc, vc, sl)
    assert o.shape == (2, 2, 2, 8) and not o.requires_grad
    ref = sb_ref.stick_breaking_decode(q, kc, vc, sl, backend="torch")
    assert rel_err(o, ref) <= 1e-5


def test_number_of_splits():
    # the split counts that bench_decode.py --sweep found fastest on an H100 (132 SMs, (B, 32, 8, 128), bf16)
    config = DecodeConfig()
    h100 = dict(sms=132, split_keys=(256, 4096))
    assert KD.split_count(config, 64, 131072, **h100) == 13  # B = 8: 6 programs per SM
    assert KD.split_count(config, 8, 131072, **h100) == 32  # B = 1: 4096 keys per split (33 measured)
    assert KD.split_count(config, 8, 32768, **h100) == 17  # B = 1: one program per SM
    assert KD.split_count(config, 64, 4096, **h100) == 3
    assert KD.split_count(config, 8, 4096, **h100) == 16  # (17 measured) at least 256 keys per split
    assert KD.split_count(config, 8, 100, **h100) == 1  # a short cache is one split
    assert KD.split_count(config, 1, 10 ** 7, **h100) == config.max_splits
    cpu = torch.device("cpu")
    assert KD.num_splits(config, 6, 20, cpu) == 1
    assert KD.num_splits(config, 1, 10_000, cpu) == 24  # the interpreter's 4 SMs, 6 programs each
    assert KD.num_splits(config, 100, 10_000, cpu) == 1


def test_empty_batch_of_new_tokens():
    kc, vc = torch.randn(2, 1, 2, 8, 4).unbind(0)
    o, rem = sb_ref.stick_breaking_decode(torch.randn(1, 2, 0, 4), kc, vc, torch.tensor([3]), return_remainder=True)
    assert o.shape == (1, 2, 0, 4) and rem.shape == (1, 2, 0)


# ---------------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------------
def expect(error, words, *args, **kw):
    with pytest.raises(error) as info:
        sb_ref.stick_breaking_decode(*args, **kw)
    for word in words:
        assert word in str(info.value), f"message {str(info.value)!r} does not mention {word!r}"


def valid(B=2, Hq=4, Hk=2, Tn=1, Tmax=8, D=4, Dv=4, dtype=torch.float32):
    return (torch.randn(B, Hq, Tn, D, dtype=dtype), torch.randn(B, Hk, Tmax, D, dtype=dtype),
            torch.randn(B, Hk, Tmax, Dv, dtype=dtype), torch.full((B,), Tmax))


def test_validation_tensors_dtypes_devices():
    q, k, v, sl = valid()
    expect(TypeError, ["q", "torch.Tensor"], q.tolist(), k, v, sl)
    expect(TypeError, ["k_cache", "torch.Tensor"], q, None, v, sl)
    expect(ValueError, ["v_cache", "4 dimensions"], q, k, v[0], sl)
    expect(TypeError, ["q", "floating-point"], q.long(), k, v, sl)
    expect(TypeError, ["dtype", "float32", "float64"], q, k, v.double(), sl)
    expect(ValueError, ["device", "meta"], q, k.to("meta"), v, sl)


def test_validation_shapes():
    q, k, v, sl = valid()
    expect(ValueError, ["batch"], q[:1], k, v, sl)
    expect(ValueError, ["Tmax"], q, k, v[:, :, :5], sl)
    expect(ValueError, ["head dim", "D"], q, k[..., :3], v, sl)
    expect(ValueError, ["positive"], q[..., :0], k[..., :0], v, sl)
    expect(ValueError, ["Hk", "k_cache and v_cache"], q, k, v[:, :1], sl)
    expect(ValueError, ["Hq = 4", "Hk = 3", "multiple"], q, torch.randn(2, 3, 8, 4), torch.randn(2, 3, 8, 4), sl)
    expect(ValueError, ["Tn = 9", "Tmax = 8"], torch.randn(2, 4, 9, 4), k, v, sl)


def test_validation_cache_seqlens():
    q, k, v, sl = valid(Tn=2)
    expect(TypeError, ["cache_seqlens", "torch.Tensor"], q, k, v, [8, 8])
    expect(TypeError, ["cache_seqlens", "int32 or int64", "float32"], q, k, v, sl.float())
    expect(ValueError, ["cache_seqlens", "shape (B,)"], q, k, v, sl[:1])
    expect(ValueError, ["cache_seqlens", "[2, 8]", "from 1"], q, k, v, torch.tensor([1, 8]))
    expect(ValueError, ["cache_seqlens", "[2, 8]", "to 9"], q, k, v, torch.tensor([2, 9]))
    expect(ValueError, ["cache_seqlens", "device", "meta"], q, k, v, sl.to("meta"))


def test_validation_options_and_backend():
    q, k, v, sl = valid()
    expect(TypeError, ["scale"], q, k, v, sl, scale="1")
    expect(ValueError, ["scale", "finite"], q, k, v, sl, scale=float("inf"))
    expect(TypeError, ["attend_current", "bool"], q, k, v, sl, attend_current=1)
    expect(TypeError, ["return_remainder", "bool"], q, k, v, sl, return_remainder=None)
    expect(ValueError, ["backend", "'cuda'"], q, k, v, sl, backend="cuda")
    expect(TypeError, ["backend='triton'", "float64"], *valid(dtype=torch.float64), backend="triton")


def test_validation_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    expect(ValueError, ["backend='triton'", "TRITON_INTERPRET=1"], *valid(), backend="triton")


# ---------------------------------------------------------------------------------------------------------------
# the layer: generating with a cache gives the full forward's outputs
# ---------------------------------------------------------------------------------------------------------------
def generate(layer, x, steps):
    """Runs x (B, T, E) through the layer's cache path in chunks of the given sizes; returns the outputs."""
    cache = layer.new_cache(x.shape[0], x.shape[1] + 3)
    outs, t = [], 0
    with torch.no_grad():
        for n in steps:
            outs.append(layer(x[:, t:t + n], cache=cache))
            t += n
    assert t == x.shape[1] and cache.seqlens.tolist() == [t] * x.shape[0]
    return torch.cat(outs, 1)


@pytest.mark.parametrize("mode", ["self", "bias", "none"])
@pytest.mark.parametrize("attend_current", [False, True])
@pytest.mark.parametrize("dtype,backend,tol", [(torch.float64, "torch", 1e-12), (torch.float32, "triton", 1e-5)])
def test_layer_generation_matches_full_forward(mode, attend_current, dtype, backend, tol):
    torch.manual_seed(0)
    layer = sb_ref.StickBreakingSelfAttention(32, 4, num_kv_heads=2, remainder=mode, attend_current=attend_current,
                                              backend=backend).to(dtype).to(DEVICE)
    if mode == "bias":
        torch.nn.init.normal_(layer.remainder_bias)
    x = torch.randn(2, 11, 32, dtype=dtype, device=DEVICE)
    with torch.no_grad():
        full = layer(x)
    # a prompt, tokens one by one, then chunks of a few tokens
    for steps in ([4, 1, 1, 1, 3, 1], [1] * 5 + [2, 3, 1]):
        err = rel_err(generate(layer, x, steps), full)
        assert err <= tol, f"steps {steps}: relative error {err:.2e}"


def test_layer_cache_errors():
    layer = sb_ref.StickBreakingSelfAttention(16, 2)
    cache = layer.new_cache(1, 4)
    with torch.no_grad():
        layer(torch.randn(1, 3, 16), cache=cache)
        with pytest.raises(ValueError, match="cache is full"):
            layer(torch.randn(1, 2, 16), cache=cache)
        with pytest.raises(ValueError, match="cu_seqlens and cache"):
            layer(torch.randn(1, 1, 16), cu_seqlens=torch.tensor([0, 1]), cache=cache)
        with pytest.raises(TypeError, match="KVCache"):
            layer(torch.randn(1, 1, 16), cache=(cache.k, cache.v))
        with pytest.raises(ValueError, match="B, Hk, Tmax, head_dim"):
            layer(torch.randn(2, 1, 16), cache=cache)


# ---------------------------------------------------------------------------------------------------------------
# compiled, on a GPU: long caches, many splits
# ---------------------------------------------------------------------------------------------------------------
GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_against_oracle(regime, dtype):
    lens = [1000, 1, 2048, 517]
    for attend_current, Tn in ((True, 1), (False, 3)):
        lens_n = [max(L, Tn) for L in lens]
        full, (q, kc, vc, sl) = decode_problem(regime, lens_n, 8, 2, 2048, 128, 128, Tn, dtype)
        o, rem = sb_ref.stick_breaking_decode(q, kc, vc, sl, attend_current=attend_current, return_remainder=True)
        check(o.cpu(), rem.cpu(), *oracle_decode(full, lens_n, Tn, attend_current), dtype, f"{regime} Tn={Tn}")


@pytest.mark.gpu
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_long_ragged_caches(regime, dtype, D):
    # up to 32768 positions, ragged, GQA 4:1 (one kv-head); B = 1 and B = 4 give many splits per sequence
    for lens, Tn in (([32768], 1), ([32768, 3, 12345, 20000], 3)):
        _, (q, kc, vc, sl) = decode_problem(regime, lens, 4, 1, 32768, D, D, Tn, dtype)
        n_split = KD.num_splits(DecodeConfig(), len(lens), max(lens), q.device)
        assert n_split > 1
        o, rem = sb_ref.stick_breaking_decode(q, kc, vc, sl, return_remainder=True)
        check(o, rem, *reference_decode(q, kc, vc, lens, True), dtype, f"{regime} {lens} ({n_split} splits)")


@pytest.mark.gpu
def test_gpu_deterministic_and_splits_agree():
    lens = [32768, 7000]
    _, (q, kc, vc, sl) = decode_problem("random", lens, 16, 4, 32768, 128, 128, 1, torch.bfloat16)
    o1, r1 = stick_breaking_decode_triton(q, kc, vc, sl, 128 ** -0.5, True)
    o2, r2 = stick_breaking_decode_triton(q, kc, vc, sl, 128 ** -0.5, True)
    assert torch.equal(o1, o2) and torch.equal(r1, r2)
    ref = reference_decode(q, kc, vc, lens, True)
    for splits in (1, 7, 64):
        got = stick_breaking_decode_triton(q, kc, vc, sl, 128 ** -0.5, True, config=DecodeConfig(splits=splits))
        check(*got, *ref, torch.bfloat16, f"{splits} splits")
