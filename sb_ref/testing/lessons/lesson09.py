"""The checks of lesson 09 (capstone: length generalisation): one per graded exercise.

The lesson trains two small causal language models on flip-flop sequences, one with stick-breaking attention and no
positional encoding, one with softmax attention and rotary position embeddings (RoPE), and tests them on sequences
longer than those they were trained on. The checks never train anything: they test the pieces on small inputs.

- :func:`check_flip_flop_batch`: the format of a flip-flop batch, every read's bit, the instruction frequencies,
  and that the batch comes from the generator it is given (same seed, same batch);
- :func:`check_rope`: the rotation against a float64 reference, and its point: ``q . k`` after RoPE depends only
  on the offset between the two positions;
- :func:`check_tiny_lm`: the model's forward: output shape, causality, no positional information outside attention
  (one repeated token gives the same logits at every position), and the pre-norm residual wiring;
- :func:`check_evaluate`: accuracy on the read positions, against models whose answers are known.

They follow :mod:`sb_ref.testing.lessons.harness`: one verdict line, None returned, stderr quiet, ``AssertionError``
naming the case, what is wrong and where, and a hint; a function that still raises ``NotImplementedError`` is "not
attempted yet". The pieces that hand the learner objects that cannot travel between processes (a random generator,
a model with known answers) or take the learner's model apart run where the learner's code lives
(:func:`sb_ref.testing.remote.run_where_it_lives`); what comes back is tensors, numbers and strings, judged here.
"""
import math

import torch

from ..remote import run_where_it_lives
from . import references
from .harness import call, compare, fmt_case, name_of, quietly, unpack, verdict
from .references import BIT1, IGNORE, P_READ, P_WRITE, READ, VOCAB_SIZE, WRITE, last_write_index

__all__ = ["check_flip_flop_batch", "check_rope", "check_tiny_lm", "check_evaluate"]


# --------------------------------------------------------------------------------------------------------------
# exercise 1: flip_flop_batch

def _flip_flop_seeded(flip_flop_batch, args):
    """``flip_flop_batch(batch, length, generator)`` with a generator seeded by ``seed``: args (batch, length, seed)."""
    batch, length, seed = args
    return flip_flop_batch(batch, length, torch.Generator().manual_seed(seed))


def _fmt_tokens(row):
    names = "01wir"
    return " ".join(names[int(a)] + names[int(b)] for a, b in zip(row[0::2], row[1::2]))


@quietly
def check_flip_flop_batch(flip_flop_batch, *, seed=0, sizes=((4, 16), (3, 2), (8, 64), (2, 130)),
                          p_write=P_WRITE, p_read=P_READ):
    """Lesson 09: ``flip_flop_batch(batch, length, generator)`` -> ``(tokens, read_mask)``, both (batch, length).

    ``sizes`` lists (batch, length) pairs (lengths even); the frequencies are tested on one large batch.
    """
    check = "check_flip_flop_batch"
    label = name_of(flip_flop_batch)

    def seeded(batch, length, seed):
        return run_where_it_lives(flip_flop_batch, _flip_flop_seeded, (batch, length, seed))

    n_reads = 0
    for batch, length in sizes:
        case = fmt_case(batch=batch, length=length, seed=seed + length)
        result = call(check, seeded, (batch, length, seed + length), {}, case, label=label)
        tokens, mask = unpack(result, 2, check, flip_flop_batch, case, ("tokens", "read_mask"))
        _check_format(check, tokens, mask, batch, length, case)
        n_reads += int(mask.sum())
        again = call(check, seeded, (batch, length, seed + length), {}, case, label=label)
        if not (torch.equal(again[0], tokens) and torch.equal(again[1], mask)):
            raise AssertionError(f"{check}: two calls with generators seeded alike gave different batches\n"
                                 f"  case: {case}\n  hint: draw every random number from the `generator` you are "
                                 "given (torch.rand(..., generator=generator), torch.randint(..., generator=generator)), "
                                 "never from the global random state.")
    batch, length = 256, 256
    case = fmt_case(batch=batch, length=length, seed=seed + 1)
    tokens, mask = unpack(call(check, seeded, (batch, length, seed + 1), {}, case, label=label), 2, check,
                          flip_flop_batch, case, ("tokens", "read_mask"))
    _check_format(check, tokens, mask, batch, length, case)
    other = call(check, seeded, (batch, length, seed + 2), {}, case, label=label)
    if torch.equal(other[0], tokens):
        raise AssertionError(f"{check}: generators with different seeds gave the same batch\n  case: {case}\n"
                             "  hint: draw every random number from the `generator` you are given.")
    instr, bits = tokens[:, 2::2], tokens[:, 3::2]  # everything after the first (forced) write
    freq = {name: float((instr == token).double().mean()) for name, token in
            (("write", WRITE), ("read", READ), ("ignore", IGNORE))}
    want = {"write": p_write, "read": p_read, "ignore": 1 - p_write - p_read}
    for name in want:
        if abs(freq[name] - want[name]) > 0.01:
            got = ", ".join(f"{k} {v:.3f}" for k, v in freq.items())
            expected = ", ".join(f"{k} {v:.3f}" for k, v in want.items())
            raise AssertionError(f"{check}: the instructions after the first have the wrong frequencies for {case}: "
                                 f"{got}; expected about {expected}\n  hint: draw u = torch.rand(...) once per "
                                 f"instruction: write if u < P_WRITE, read if P_WRITE <= u < P_WRITE + P_READ, ignore "
                                 "otherwise; only the first instruction is forced to be a write.")
    for name, token, tol in (("write", WRITE, 0.05), ("ignore", IGNORE, 0.02)):
        ones = float(bits[instr == token].double().mean())
        if abs(ones - 0.5) > tol:
            raise AssertionError(f"{check}: the bits after '{name[0]}' instructions are 1 with frequency {ones:.3f}, "
                                 f"expected about 0.5, for {case}\n  hint: the bits of writes and ignores are fair "
                                 "coin flips (torch.randint(0, 2, ..., generator=generator)).")
    verdict(check, len(sizes) + 1, f"format, every read's bit ({n_reads} reads), frequencies write "
            f"{freq['write']:.3f}, read {freq['read']:.3f}, ignore {freq['ignore']:.3f}; "
            "same seed, same batch")


def _check_format(check, tokens, mask, batch, length, case):
    """Types, shapes, the instruction/bit layout, the read mask, and every read's bit."""
    for name, x in (("tokens", tokens), ("read_mask", mask)):
        if not isinstance(x, torch.Tensor):
            raise AssertionError(f"{check}: {name} should be a torch tensor, got {type(x).__name__}\n  case: {case}")
        if tuple(x.shape) != (batch, length):
            raise AssertionError(f"{check}: {name} has shape {tuple(x.shape)}, expected (batch, length) = "
                                 f"{(batch, length)}\n  case: {case}")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise AssertionError(f"{check}: tokens should be integers (torch.long), got {tokens.dtype}\n  case: {case}\n"
                             "  hint: an embedding layer takes token ids: use torch.long.")
    if mask.dtype != torch.bool:
        raise AssertionError(f"{check}: read_mask should be a bool tensor, got {mask.dtype}\n  case: {case}")
    tokens, mask = tokens.cpu().long(), mask.cpu()
    layout = torch.zeros(length, dtype=torch.bool)
    layout[0::2] = True  # instruction positions
    wrong = torch.where(layout, tokens < WRITE, tokens > BIT1) | (tokens < 0) | (tokens > READ)
    if bool(wrong.any()):
        b, t = (int(i) for i in wrong.nonzero()[0])
        what = "an instruction (w = 2, i = 3, r = 4)" if t % 2 == 0 else "a bit (0 or 1)"
        raise AssertionError(f"{check}: tokens[{b}, {t}] = {int(tokens[b, t])}, but position {t} must hold {what}\n"
                             f"  case: {case}\n  hint: a sequence is length / 2 pairs (instruction, bit): "
                             "instructions at even positions, bits at odd positions.")
    if bool((tokens[:, 0] != WRITE).any()):
        b = int((tokens[:, 0] != WRITE).nonzero()[0])
        raise AssertionError(f"{check}: sequence {b} starts with token {int(tokens[b, 0])}, not a write (2)\n"
                             f"  case: {case}\n  hint: the first instruction is always a write, so that every read "
                             "has a bit to return.")
    want = torch.zeros_like(mask)
    want[:, 1::2] = tokens[:, 0::2] == READ
    if not torch.equal(mask, want):
        b, t = (int(i) for i in (mask != want).nonzero()[0])
        raise AssertionError(f"{check}: read_mask[{b}, {t}] is {bool(mask[b, t])}, expected {bool(want[b, t])}\n"
                             f"  case: {case}\n  sequence {b}: {_fmt_tokens(tokens[b][:t + 2])} ...\n"
                             "  hint: read_mask is True exactly at the BIT positions that follow an 'r' instruction "
                             "(odd positions t with tokens[t - 1] == 4): the answers the model is graded on.")
    instr, bits = tokens[:, 0::2], tokens[:, 1::2]
    last = bits.gather(1, last_write_index(instr == WRITE))
    bad = (instr == READ) & (bits != last)
    if bool(bad.any()):
        b, p = (int(i) for i in bad.nonzero()[0])
        w = int(last_write_index(instr == WRITE)[b, p])
        raise AssertionError(f"{check}: the read at position {2 * p + 1} of sequence {b} holds bit {int(bits[b, p])}, "
                             f"but the last write before it (position {2 * w + 1}) wrote {int(bits[b, w])}\n"
                             f"  case: {case}\n  sequence {b}: {_fmt_tokens(tokens[b][:2 * p + 2])} ...\n"
                             "  hint: a read's bit is the bit of the most recent write; ignores change nothing, and a "
                             "later write replaces the stored bit.")


# --------------------------------------------------------------------------------------------------------------
# exercise 2: rope

_ROPE_CASES = (((2, 3, 7, 8), "arange", torch.float64),
               ((1, 2, 5, 16), "offset", torch.float64),
               ((3, 6, 4), "shuffled", torch.float64),
               ((1, 1, 1, 2), "single", torch.float64),
               ((5, 12), "arange", torch.float64),
               ((2, 4, 9, 32), "spaced", torch.float32))


def _positions(kind, T, gen):
    if kind == "offset":
        return torch.arange(100, 100 + T)
    if kind == "shuffled":
        return torch.randperm(600, generator=gen)[:T]
    if kind == "single":
        return torch.tensor([7])
    if kind == "spaced":
        return torch.arange(T) * 60
    return torch.arange(T)


@quietly
def check_rope(rope, *, seed=0, cases=_ROPE_CASES):
    """Lesson 09: ``rope(x, positions)`` for x (..., T, d) with d even and positions (T,) integers.

    ``cases`` lists (shape of x, kind of positions, dtype); kinds: "arange", "offset" (100, 101, ...), "shuffled",
    "single", "spaced" (0, 60, 120, ...).
    """
    check = "check_rope"
    gen = torch.Generator().manual_seed(seed)
    # The point of RoPE: q . k after the rotation depends only on the offset between the positions.
    d, offset = 16, 5
    q, k = torch.randn(2, d, generator=gen, dtype=torch.float64)
    pos_k = torch.tensor([0, 3, 40, 120, 250])
    case = fmt_case(d=d, query_positions=tuple((pos_k + offset).tolist()), key_positions=tuple(pos_k.tolist()),
                    dtype=torch.float64)
    q_rot = call(check, rope, (q.expand(len(pos_k), d).clone(), pos_k + offset), {}, case)
    k_rot = call(check, rope, (k.expand(len(pos_k), d).clone(), pos_k.clone()), {}, case)
    dots = [float(torch.as_tensor(a).double() @ torch.as_tensor(b).double()) for a, b in zip(q_rot, k_rot)]
    spread = max(dots) - min(dots)
    if not spread <= 1e-3 * float(q.norm() * k.norm()):  # loose: float32 angles are graded below, not here
        raise AssertionError(
            f"{check}: q . k after rope should depend only on the offset i - j = {offset}, but the dot products "
            f"at the positions of {case} are {', '.join(f'{x:.6f}' for x in dots)}\n"
            "  hint: rotate each pair of coordinates by an angle proportional to the position (position * theta_m, "
            "the same theta_m for queries and keys), and rotate q and k the same way: then the dot product sees "
            "only the difference of the angles.")
    n, worst = 1, 0.0
    for shape, kind, dtype in cases:
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        positions = _positions(kind, shape[-2], gen)
        case = fmt_case(x=tuple(shape), dtype=dtype, positions=tuple(positions.tolist()))
        got = call(check, rope, (x.to(dtype), positions.clone()), {}, case)
        if isinstance(got, torch.Tensor) and got.dtype != dtype:
            raise AssertionError(f"{check}: rope returned {got.dtype} for {dtype} input\n  case: {case}\n"
                                 "  hint: compute the angles in float64, then cast cos and sin to x.dtype.")
        ref = references.rope(x.to(dtype), positions)
        worst = max(worst, compare(check, got, ref, 1e-12 if dtype == torch.float64 else 1e-5, case,
                                   _rope_hint(got, x.to(dtype), positions), what="rope(x, positions)"))
        n += 1
    verdict(check, n, f"q . k depends only on i - j; {n - 1} shapes and position sets (offset, shuffled, up to "
            "600) in float64 and float32", worst)


def _rope_hint(got, x, positions):
    got = got.detach().to("cpu", torch.float64) if isinstance(got, torch.Tensor) else None
    T = x.shape[-2]

    def close(ref):
        return got is not None and got.shape == ref.shape and float((got - ref).abs().max()) < 1e-4

    if close(references.rope(x, positions)):
        return ("nearly right, but not to the last digits: compute the angles positions * theta_m in float64 (a "
                "float32 angle of position 500 is off by ~3e-5), then cast cos and sin to x.dtype.")
    if close(references.rope(x, positions, pairs="halves")):
        return ("your rotation pairs x[m] with x[m + d/2]; this course pairs neighbours, (x[2m], x[2m + 1]) "
                "(x[..., 0::2] and x[..., 1::2]), rotated by positions * theta_m, theta_m = base^(-2m/d), "
                "and interleaves the results back.")
    if T > 1 and close(references.rope(x, torch.arange(T))):
        return "rotate by the positions you are given, not by 0, 1, ..., T - 1."
    if close(references.rope(x, -positions)):
        return "the rotation goes the other way: (x1 cos - x2 sin, x1 sin + x2 cos) for the pair (x1, x2)."
    return ("pairs (x[2m], x[2m + 1]) rotate by the angle positions * theta_m with theta_m = base^(-2m/d) for "
            "m = 0 .. d/2 - 1 (base 10000): (x1 cos - x2 sin, x1 sin + x2 cos). Compute the angles in float64 (a "
            "float32 angle of position 500 is off by ~3e-5) and cast cos and sin to x.dtype.")


# --------------------------------------------------------------------------------------------------------------
# exercise 3: TinyLM

_LM_CONFIGS = (dict(dim=32, num_heads=2, num_layers=2, B=2, T=12),
               dict(dim=16, num_heads=2, num_layers=1, B=1, T=1))
_WIRING = ("pre-norm residual blocks: x = self.embed(tokens); for each block, x = x + block.attn(block.norm1(x)), "
           "then x = x + block.mlp(block.norm2(x)); logits = self.head(self.norm(x)).")


def _tiny_lm_outputs(model_class, args):
    """Builds the learner's model as :func:`check_tiny_lm` sets it up and runs it on the check's token batches.

    args: (constructor kwargs, seed, token batches). Returns ("ok", [logits per batch], the model's parameters) or
    (stage, message) for what failed: "constructor", "setup", "forward". The reference logits are computed by the
    check, from those parameters, where the learner's code does not run. A stub's NotImplementedError propagates (the
    check reports "not attempted yet")."""
    kwargs, seed, batches = args
    torch.manual_seed(seed)
    try:
        model = model_class(**kwargs)
    except NotImplementedError:
        raise
    except Exception as exc:  # the learner's constructor
        return "constructor", f"{type(exc).__name__}: {exc}"
    try:
        model = model.double().eval()
        if kwargs["attention"] == "softmax_rope":
            for block in model.blocks:
                reference = references.SoftmaxRopeAttention(kwargs["dim"], kwargs["num_heads"]).double()
                reference.load_state_dict(block.attn.state_dict())
                block.attn = reference
    except Exception as exc:
        return "setup", f"{type(exc).__name__}: {exc}"
    outputs = []
    for tokens in batches:
        try:
            with torch.no_grad():
                outputs.append(model(tokens.clone()))
        except NotImplementedError:
            raise
        except Exception as exc:  # the learner's forward
            return "forward", f"{type(exc).__name__}: {exc}"
    return "ok", outputs, {name: value.detach() for name, value in model.state_dict().items()}


def _reference_logits(kwargs, parameters, tokens):
    """The lesson's forward on a trusted copy of the given model holding the learner's parameters."""
    model = references.ReferenceTinyLM(**kwargs).double().eval()
    model.load_state_dict(parameters)
    with torch.no_grad():
        return model(tokens)


@quietly
def check_tiny_lm(model_class, *, seed=0, configs=_LM_CONFIGS, attentions=("stick_breaking", "softmax_rope")):
    """Lesson 09: ``TinyLM(attention, vocab_size, dim, num_heads, num_layers)``'s forward: tokens (B, T) -> logits
    (B, T, vocab_size), causal, no positional information outside attention, the lesson's pre-norm wiring.

    The softmax variant's attention modules are replaced by a reference with the same weights, so that this check
    does not depend on the learner's ``rope``.
    """
    check = "check_tiny_lm"
    n, worst = 0, 0.0
    label = f"{name_of(model_class)}.forward"
    for config in configs:
        config = dict(config)
        B, T = config.pop("B"), config.pop("T")
        for attention in attentions:
            kwargs = dict(attention=attention, vocab_size=VOCAB_SIZE, **config)
            case = fmt_case(**kwargs, tokens=(B, T))
            gen = torch.Generator().manual_seed(seed + 100 + n)
            tokens = torch.randint(0, VOCAB_SIZE, (B, T), generator=gen)
            s = T // 2  # causality: the second half changed, the first half must not move
            changed = tokens.clone()
            changed[:, s:] = (tokens[:, s:] + torch.randint(1, VOCAB_SIZE, (B, T - s), generator=gen)) % VOCAB_SIZE
            same = torch.full((1, max(T, 6)), IGNORE)
            result = call(check, lambda: run_where_it_lives(model_class, _tiny_lm_outputs,
                                                            (kwargs, seed + n, [tokens, changed, same])),
                          (), {}, case, label=label)
            stage = result[0]
            if stage == "constructor":
                raise AssertionError(f"{check}: `{name_of(model_class)}` raised {result[1]}\n  case: {case}\n"
                                     "  hint: keep the constructor you were given; write forward only.")
            if stage == "ok":
                try:
                    want = _reference_logits(kwargs, result[2], tokens)
                except Exception as exc:  # parameters that the given constructor does not have
                    stage, result = "reference", (stage, f"{type(exc).__name__}: {exc}"[:500])
            if stage in ("setup", "reference"):
                raise AssertionError(f"{check}: your model lacks a module of the given constructor: {result[1]}\n"
                                     f"  case: {case}\n  hint: keep the constructor you were given (embed, blocks "
                                     "with norm1, attn, norm2, mlp; norm; head).")
            if stage == "forward":
                raise AssertionError(f"{check}: `{label}` raised {result[1]}\n  case: {case}")
            got, other, flat = result[1]
            if not isinstance(got, torch.Tensor) or tuple(got.shape) != (B, T, VOCAB_SIZE):
                shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                raise AssertionError(f"{check}: the logits have shape {shape}, expected (B, T, vocab_size) = "
                                     f"{(B, T, VOCAB_SIZE)}\n  case: {case}\n  hint: one row of vocab_size logits "
                                     "per position: the head maps each position's vector to the next token's scores.")
            if T > 1:
                diff = (other[:, :s] - got[:, :s]).abs().detach()
                if float(diff.max()) > 1e-12 * (1 + float(got.abs().max())):
                    b, t, _ = (int(i) for i in (diff == diff.max()).nonzero()[0])
                    raise AssertionError(f"{check}: changing the tokens at positions >= {s} changed the logits at "
                                         f"position {t} (sequence {b}) by {float(diff.max()):.2e}\n  case: {case}\n"
                                         f"  hint: the model is causal: position t may use tokens 0..t only. Use the "
                                         "attention modules of the blocks (they are causal) and mix nothing else "
                                         "along the sequence.")
            flat = flat.detach()
            drift = (flat - flat[:, :1]).abs()
            if float(drift.max()) > 1e-9 * (1 + float(flat.abs().max())):
                t = int(drift.amax(-1)[0].argmax())
                raise AssertionError(f"{check}: a sequence of one repeated token should give the same logits at every "
                                     f"position; yours differ between positions 0 and {t} by {float(drift.max()):.2e}\n"
                                     f"  case: {case}\n  hint: add no positional encoding to the embeddings: "
                                     "stick-breaking attention gets order from the process itself, and the softmax "
                                     "variant from the rotation inside its attention. Over identical tokens the "
                                     "weights of each query sum to 1 (with the remainder) over identical values, so "
                                     "nothing can tell the positions apart.")
            worst = max(worst, compare(check, got, want, 1e-12, case, _WIRING, what="the output"))
            n += 1
    verdict(check, n, f"variants {', '.join(attentions)}; shapes, causal, no positional encoding, pre-norm wiring; "
            "float64", worst)


# --------------------------------------------------------------------------------------------------------------
# exercise 4: evaluate

def _evaluate_rule_model(evaluate, args):
    """``evaluate(model, tokens, read_mask)`` for a :class:`~sb_ref.testing.lessons.references.RuleModel` of rule
    ``RULES[index]``: args (index, tokens, read_mask)."""
    index, tokens, mask = args
    return evaluate(references.RuleModel(references.RULES[index][1]), tokens, mask)


@quietly
def check_evaluate(evaluate, *, seed=0, sizes=((8, 64), (3, 130), (16, 20))):
    """Lesson 09: ``evaluate(model, tokens, read_mask)`` -> the model's accuracy (a float) on the read positions,
    tested with models whose answers are known on flip-flop batches of ``sizes`` (batch, length)."""
    check = "check_evaluate"
    n = 0
    for batch, length in sizes:
        tokens, mask = references.flip_flop(batch, length, torch.Generator().manual_seed(seed + length))
        for index, (what, rule) in enumerate(references.RULES):
            model = references.RuleModel(rule)
            case = fmt_case(model=f"one that {what}", tokens=(batch, length), reads=int(mask.sum()))
            got = call(check, lambda *args: run_where_it_lives(evaluate, _evaluate_rule_model, args),
                       (index, tokens.clone(), mask.clone()), {}, case, label=name_of(evaluate))
            try:
                got = float(got)
            except (TypeError, ValueError):
                raise AssertionError(f"{check}: evaluate should return a number (the accuracy), got "
                                     f"{type(got).__name__}\n  case: {case}") from None
            with torch.no_grad():
                logits = model(tokens)
            want = references.flip_flop_accuracy(logits, tokens, mask)
            if not abs(got - want) <= 1e-6:  # float32 means are fine
                raise AssertionError(f"{check}: accuracy {got:.6f}, expected {want:.6f}\n  case: {case}\n"
                                     f"  hint: {_evaluate_hint(got, logits, tokens, mask)}")
            n += 1
    verdict(check, n, "models with known answers: always right, always 0, first write, previous pair")


def _evaluate_hint(got, logits, tokens, mask):
    pred = logits.argmax(-1)
    alternatives = []
    if bool(mask.any()):
        alternatives.append((float((pred == tokens)[mask].double().mean()),
                             "the logits at position t predict the token at t + 1: compare the argmax at t - 1 "
                             "with the token at each read position t (logits[:, :-1] against tokens[:, 1:])."))
    alternatives.append((float((pred[:, :-1] == tokens[:, 1:]).double().mean()),
                         "count only the read positions (read_mask), not every position."))
    hit = (pred[:, :-1] == tokens[:, 1:]) & mask[:, 1:]
    reads = mask[:, 1:].sum(1)
    has = reads > 0
    if bool(has.any()):
        alternatives.append((float((hit.sum(1)[has] / reads[has]).double().mean()),
                             "average over all read positions of the batch together, not per sequence first "
                             "(sequences have different numbers of reads)."))
    for value, hint in alternatives:
        if math.isfinite(value) and abs(got - value) <= 1e-6:
            return hint
    return ("accuracy = (number of read positions t where argmax(logits[:, t - 1]) == tokens[:, t]) / (number of "
            "read positions); read_mask marks the positions t.")
