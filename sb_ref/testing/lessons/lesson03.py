"""The checks of lesson 03 (the attention layer): repeating kv heads for GQA, the three remainder modes, and the
learner's layer forward against ``sb_ref.StickBreakingSelfAttention`` with the same weights.

They follow :mod:`sb_ref.testing.lessons.harness`: one verdict line, quiet on stderr, ``AssertionError`` naming the
case, the worst error, where it is, and a hint, and "not attempted yet" for a stub. The keyword arguments give the
hidden variants.
"""
import torch

from ...layer import StickBreakingSelfAttention
from . import references
from .harness import call, compare, fmt_case, name_of, quiet, quietly, verdict

__all__ = ["check_repeat_kv", "check_apply_remainder", "check_layer_forward"]


@quietly
def check_repeat_kv(repeat_kv, *, seed=0):
    """Lesson 03: ``repeat_kv(x, n_rep)``: (B, Hk, T, D) -> (B, Hk * n_rep, T, D); query head h uses kv head h // n_rep."""
    check = "check_repeat_kv"
    gen = torch.Generator().manual_seed(seed)
    cases = [((2, 1, 5, 3), 4), ((1, 3, 7, 6), 2), ((1, 2, 1, 5), 1), ((2, 4, 3, 2), 3)]
    for shape, n_rep in cases:
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        case = fmt_case(x=shape, n_rep=n_rep)
        got = call(check, repeat_kv, (x.clone(), n_rep), {}, case)
        ref = x.repeat_interleave(n_rep, dim=1)
        hint = "query head h reads kv head h // n_rep: heads are repeated in place (0, 0, 1, 1), not tiled (0, 1, 0, 1)."
        compare(check, got, ref, 0.0, case, hint)
    verdict(check, len(cases), "Hk in 1..4, n_rep in 1..4")


@quietly
def check_apply_remainder(apply_remainder, *, seed=0):
    """Lesson 03: ``apply_remainder(o, rem, v, mode, bias=None)`` for mode "self", "bias" and "none", with GQA."""
    check = "check_apply_remainder"
    gen = torch.Generator().manual_seed(seed)
    n = 0
    for B, Hq, Hk, T, Dv in ((1, 2, 2, 1, 4), (2, 4, 2, 9, 6), (1, 6, 2, 5, 3), (1, 3, 1, 4, 5)):
        for mode in ("self", "bias", "none"):
            o = torch.randn(B, Hq, T, Dv, generator=gen, dtype=torch.float64)
            rem = torch.rand(B, Hq, T, generator=gen, dtype=torch.float64)
            v = torch.randn(B, Hk, T, Dv, generator=gen, dtype=torch.float64)
            bias = torch.randn(Hq, Dv, generator=gen, dtype=torch.float64) if mode == "bias" else None
            case = fmt_case(mode=mode, o=(B, Hq, T, Dv), v=(B, Hk, T, Dv))
            got = call(check, apply_remainder, (o.clone(), rem.clone(), v.clone(), mode),
                       {"bias": None if bias is None else bias.clone()}, case)
            hints = {"self": "add rem[..., None] * v of the query's own position, taken from the query head's "
                             "kv head (h // (Hq // Hk)).",
                     "bias": "add rem[..., None] * bias[h], the learned vector of query head h.",
                     "none": "mode 'none' drops the remainder: return o unchanged."}
            compare(check, got, references.apply_remainder(o, rem, v, mode, bias), 1e-14, case, hints[mode])
            n += 1
    verdict(check, n, "modes self, bias, none; with and without GQA")


@quietly
def check_layer_forward(layer_class, *, seed=0, configs=None):
    """Lesson 03: a layer class with ``StickBreakingSelfAttention``'s constructor and parameters, whose forward the
    learner wrote; its output must match ``sb_ref.StickBreakingSelfAttention`` with the same weights (float64)."""
    check = "check_layer_forward"
    if configs is None:
        configs = [dict(embed_dim=32, num_heads=4, T=9, B=2),
                   dict(embed_dim=24, num_heads=2, T=1, B=1),
                   dict(embed_dim=48, num_heads=4, num_kv_heads=2, T=11, B=1),
                   dict(embed_dim=30, num_heads=6, num_kv_heads=2, T=7, B=2)]
    n = 0
    for config in configs:
        config = dict(config)
        T, B = config.pop("T"), config.pop("B")
        for remainder in ("self", "bias", "none"):
            for attend_current in (False, True):
                kwargs = dict(config, remainder=remainder, attend_current=attend_current)
                case = fmt_case(**kwargs, x=(B, T, config["embed_dim"]))
                torch.manual_seed(seed + n)
                ref = StickBreakingSelfAttention(**kwargs, backend="torch").double()
                if ref.remainder_bias is not None:
                    with torch.no_grad():
                        ref.remainder_bias.normal_()
                layer = call(check, layer_class, (), kwargs, case,
                             hint="keep the constructor you were given; write forward only.")
                try:
                    layer = layer.double()
                    layer.load_state_dict(ref.state_dict())
                except Exception as exc:
                    raise AssertionError(f"{check}: could not give your layer the reference weights: {exc}\n"
                                         f"  case: {case}\n  hint: keep the parameter names of the constructor "
                                         "you were given (q_proj, k_proj, v_proj, out_proj, remainder_bias).") from exc
                x = torch.randn(B, T, config["embed_dim"], dtype=torch.float64,
                                generator=torch.Generator().manual_seed(seed + n))
                got = call(check, layer, (x.clone(),), {}, case, label=f"{name_of(layer_class)}.forward")
                with torch.no_grad(), quiet():
                    want = ref(x)
                hint = ("project x to q (Hq heads), k and v (Hk heads) of head_dim each, shape (B, H, T, head_dim); "
                        "run stick-breaking attention with the remainder; add the remainder as the mode says; "
                        "merge the heads back to (B, T, E) and apply out_proj.")
                compare(check, got, want, 1e-12, case, hint, what="the layer's output")
                n += 1
    verdict(check, n, "remainder self/bias/none; attend_current both ways; with and without GQA; T = 1")

