"""The checks of lesson 08 (performance): counting the work, timing it correctly, and a causal forward kernel
that skips the key tiles above the diagonal.

- :func:`check_attention_flops`: ``attention_flops(B, H, T, D, causal=True, backward=False)`` counts the FLOPs as
  the benchmark does (``2*B*H*T^2*D`` for a causal forward, twice that without the mask, 2.5 times the forward for
  the backward);
- :func:`check_median_ms`: ``median_ms(fn, *args, warmup=3, reps=10)`` calls ``fn`` ``warmup`` times untimed, then
  ``reps`` times timed, and returns the median in milliseconds. On a CPU it is given a fake ``fn`` whose calls
  sleep for known times (deterministic up to the clock's resolution); on a GPU also one that only queues GPU work,
  which a timer that does not synchronise measures as almost nothing;
- :func:`check_fast_forward`: ``fast_forward(q, k, v)`` -> o, first its numerics against the float64 oracle, then
  :func:`sb_ref.testing.speed.check_speed`: on a GPU a tier of the points by its speed against ``sb_ref``'s own
  kernel, on a CPU the proxies (no ``T * T`` allocation, and fewer key elements loaded than the lesson's kernel that
  sweeps every key tile). It returns a :class:`~sb_ref.testing.speed.Score`: nbgrader reads it as partial credit.

Like the other checks they print one verdict line, keep stderr silent, raise ``AssertionError`` with a message a
learner can act on, and say "not attempted yet" for a stub. Under the course's grader, ``median_ms`` is tried in
the notebook's kernel, next to its code (:func:`sb_ref.testing.remote.run_where_it_lives`), and ``fast_forward``
is timed from outside (:func:`sb_ref.testing.speed.time_pair`).
"""
import math
import statistics
import time

import torch

from ..core import REGIMES, make_inputs, oracle_attention
from ..remote import run_where_it_lives
from ..speed import TimingCase, check_speed, reference_attention
from .harness import TOLERANCE, call, compare, fmt_case, name_of, not_attempted, quietly, verdict

__all__ = ["check_attention_flops", "check_median_ms", "check_fast_forward",
           "FAST_FORWARD_TIERS", "SWEEP_BLOCK_M"]

#: (smallest throughput ratio to sb_ref's kernel, share of the points) for the lesson's simple kernel, best first.
#: sb_ref's forward is tuned far beyond what the lesson asks (float16 products, tensor-core scans, polynomial logs).
#: Measured on an H100 at (4, 12, 4096, 128), bf16: the lesson's solution (diagonal start, 32 x 32 tiles) about
#: 0.4x sb_ref's throughput, 64 x 32 tiles 0.3-0.38x, the given kernel that sweeps every tile with 16 x 16 tiles
#: 0.15x (0.11x at D = 64).
FAST_FORWARD_TIERS = ((0.25, 1.0), (0.18, 0.75), (0.12, 0.5), (0.0, 0.25))

#: query rows per program of the lesson's given kernel, which sweeps every key tile: the CPU proxy's yardstick
SWEEP_BLOCK_M = 16


def _flops(B, H, T, D, causal, backward):
    forward = 2 * B * H * T * T * D * (1 if causal else 2)
    return forward * 2.5 if backward else forward


# --------------------------------------------------------------------------------------------------------------
# exercise 1: attention_flops

def _flop_hint(ratio, causal, backward):
    """The most likely mistake behind a count that is ``ratio`` times the answer."""
    def near(r):
        return math.isclose(ratio, r, rel_tol=1e-6)
    if backward and near(1.4):
        return "backward=True asks for the backward alone, 2.5 times the forward, not forward + backward (3.5 times)."
    if backward and near(0.4):
        return "the backward costs 2.5 times the forward (five T x T products against the forward's two)."
    if causal and near(2.0):
        return "with the causal mask only the lower half of the T x T scores is computed: 2*B*H*T^2*D, half the square."
    if not causal and near(0.5):
        return "with causal=False every query sees every key: the whole T x T square, twice the causal count."
    if near(0.5) or near(0.25):
        return "count both products, q k^T and A v, each 2*T*T*D per head for the whole square (a multiply-add is 2 FLOPs)."
    return ("forward: 2*B*H*T^2*D FLOPs with the causal mask, twice that without; backward: 2.5 times the forward "
            "(use floats or ints, no rounding).")


@quietly
def check_attention_flops(attention_flops, *, seed=0):
    """Lesson 08: ``attention_flops(B, H, T, D, causal=True, backward=False)`` -> FLOPs as the benchmark counts them."""
    check = "check_attention_flops"
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4, 12, 4096, 128), (8, 16, 4096, 64), (1, 1, 1, 1), (2, 3, 100, 48),
              tuple(int(torch.randint(1, hi, (1,), generator=gen)) for hi in (9, 33, 5000, 257))]
    n = 0
    for B, H, T, D in shapes:
        for causal in (True, False):
            for backward in (False, True):
                case = fmt_case(B=B, H=H, T=T, D=D, causal=causal, backward=backward)
                got = call(check, attention_flops, (B, H, T, D), {"causal": causal, "backward": backward}, case)
                want = _flops(B, H, T, D, causal, backward)
                try:
                    value = float(got)
                except (TypeError, ValueError):
                    raise AssertionError(f"{check}: `{name_of(attention_flops)}` should return a number, got "
                                         f"{type(got).__name__}\n  case: {case}") from None
                if not math.isclose(value, want, rel_tol=1e-9):
                    ratio = value / want
                    hint = _flop_hint(ratio, causal, backward)
                    raise AssertionError(f"{check}: wrong count for {case}: got {value:.6g}, expected {want:.6g} "
                                         f"({ratio:.3g} times the answer)\n  hint: {hint}")
                n += 1
    verdict(check, n, "the benchmark's shapes, T = 1 and random shapes; causal and backward both ways")


# --------------------------------------------------------------------------------------------------------------
# exercise 2: median_ms

def _sleep_trial(median_ms, warmup_ms, timed_ms, warmup, reps):
    """Runs ``median_ms`` on a fake function whose calls sleep for known times; returns plain values:
    (the result, or its type's name when it is not a number; the number of calls; whether every call got the
    arguments)."""
    calls = []
    token = (7, "args")

    def fake(*args):
        calls.append(args)
        i = len(calls) - 1
        ms = warmup_ms if i < warmup else timed_ms[(i - warmup) % len(timed_ms)]
        time.sleep(ms / 1e3)

    value = median_ms(fake, *token, warmup=warmup, reps=reps)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        try:
            value = float(value)  # numpy and 0-d torch numbers
        except (TypeError, ValueError):
            return type(value).__name__, len(calls), all(c == token for c in calls)
    return float(value), len(calls), all(c == token for c in calls)


def _gpu_trial(median_ms, target_ms=4.0):
    """(learner's median, the median GPU time per call measured with CUDA events) for a function that only queues
    about ``target_ms`` of GPU work and returns at once."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    torch.cuda._sleep(1_000_000)
    end.record()
    torch.cuda.synchronize()
    cycles = int(1_000_000 * target_ms / max(start.elapsed_time(end), 1e-3))

    def queue_gpu_work():
        torch.cuda._sleep(cycles)

    value = float(median_ms(queue_gpu_work, warmup=2, reps=5))
    times = []
    for _ in range(5):
        start.record()
        queue_gpu_work()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return value, statistics.median(times)


@quietly
def check_median_ms(median_ms, *, seed=0):
    """Lesson 08: ``median_ms(fn, *args, warmup=3, reps=10)`` -> median milliseconds of the timed calls of fn(*args).

    ``seed`` shuffles the order of the fake function's timed calls (the hidden variant).
    """
    check = "check_median_ms"
    gen = torch.Generator().manual_seed(seed)
    cases = [  # (warm-up call ms, timed call ms, warmup, reps)
        (30.0, [3.0, 12.0, 12.0, 3.0, 60.0], 1, 5),   # median 12, mean 18, min 3, max 60
        (25.0, [2.0, 2.0, 2.0], 4, 3),                # median 2; with the warm-up calls counted: 25
    ]
    for warmup_ms, timed, warmup, reps in cases:
        timed = [timed[i] for i in torch.randperm(len(timed), generator=gen).tolist()]
        case = f"warmup={warmup}, reps={reps}; a fake fn whose warm-up calls take {warmup_ms:g} ms and whose timed calls " \
               f"take {', '.join(f'{t:g}' for t in timed)} ms"
        try:
            start = time.perf_counter()  # this process's clock, around the whole trial wherever it runs
            value, n_calls, args_ok = run_where_it_lives(median_ms, _sleep_trial, warmup_ms, timed, warmup, reps)
            elapsed_ms = (time.perf_counter() - start) * 1e3
        except NotImplementedError:
            raise not_attempted(check, f"`{name_of(median_ms)}`") from None
        except Exception as exc:
            raise AssertionError(f"{check}: `{name_of(median_ms)}` raised {type(exc).__name__}: {exc}\n  case: {case}")
        if n_calls != warmup + reps:
            raise AssertionError(f"{check}: fn was called {n_calls} times, expected warmup + reps = {warmup + reps}\n"
                                 f"  case: {case}\n  hint: call fn(*args) `warmup` times without timing them, then "
                                 "`reps` times, timing each call.")
        asleep_ms = warmup * warmup_ms + sum(timed[i % len(timed)] for i in range(reps))
        if elapsed_ms < 0.95 * asleep_ms:  # what the trial reported about itself is contradicted by the clock
            raise AssertionError(f"{check}: the trial took {elapsed_ms:.0f} ms, but warmup + reps = {warmup + reps} "
                                 f"calls of fn sleep {asleep_ms:.0f} ms in all: fn was not called that many times\n"
                                 f"  case: {case}")
        if not args_ok:
            raise AssertionError(f"{check}: fn did not get the arguments passed to median_ms\n  case: {case}\n"
                                 "  hint: call fn(*args) every time.")
        if isinstance(value, str):
            raise AssertionError(f"{check}: `{name_of(median_ms)}` returned a {value}, expected a number of "
                                 f"milliseconds\n  case: {case}")
        want = statistics.median(timed)
        if not want - 0.5 <= value <= want + 4.0:
            candidates = {"the median in seconds instead of milliseconds": want / 1e3,
                          "the mean of the timed calls, not their median": statistics.mean(timed),
                          "the fastest call, not the median": min(timed),
                          "the slowest call, not the median": max(timed),
                          "the total of the timed calls, not their median": sum(timed),
                          "the median over the warm-up calls too": statistics.median(timed + [warmup_ms] * warmup)}
            what, _ = min(candidates.items(), key=lambda kv: abs(math.log(max(value, 1e-9) / kv[1])))
            raise AssertionError(f"{check}: returned {value:.4g} ms, expected about {want:g} ms (the median of the "
                                 f"timed calls)\n  case: {case}\n  hint: this looks like {what}. Time each of the "
                                 "`reps` calls on its own (time.perf_counter before and after, synchronize() before "
                                 "reading the clock), convert to milliseconds, and return statistics.median.")
    detail = "call counts, arguments, warm-up left out, median in ms"
    if torch.cuda.is_available():
        value, gpu_ms = run_where_it_lives(median_ms, _gpu_trial)
        if not 0.7 * gpu_ms <= value <= 2 * gpu_ms + 1.0:
            raise AssertionError(f"{check}: for a function that queues {gpu_ms:.2f} ms of GPU work (CUDA events), "
                                 f"`{name_of(median_ms)}` returned {value:.3g} ms\n  hint: a kernel launch returns before "
                                 "the GPU has done the work: call torch.cuda.synchronize() (the notebook's "
                                 "synchronize()) after each call, before reading the clock, and once after the "
                                 "warm-up.")
        detail += f"; GPU work of {gpu_ms:.1f} ms timed as {value:.1f} ms"
    verdict(check, len(cases) + torch.cuda.is_available(), detail)


# --------------------------------------------------------------------------------------------------------------
# exercise 3: fast_forward

def _make_args(seed, B, H, T, D):
    def make_args(device):
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        return make_inputs("random", B=B, Hq=H, T=T, D=D, dtype=dtype, device=device, seed=seed)
    return make_args


@quietly
def check_fast_forward(fast_forward, *, seed=0, T=64, D=16, H=2, points=3):
    """Lesson 08: ``fast_forward(q, k, v)`` -> o (causal, default scale): numerics, then speed (a Score).

    Numerics: every regime at (1, H, T, D), a batch of two with a length that is not a multiple of the tiles and a
    head dim that is not a power of two, and T = 1, against the float64 oracle (float32 on a CPU, bfloat16 on a GPU).
    Speed: :func:`sb_ref.testing.speed.check_speed` with :data:`FAST_FORWARD_TIERS`; on a CPU the key elements
    loaded must stay under 3/4 of what the lesson's sweeping kernel (query blocks of :data:`SWEEP_BLOCK_M`) loads.
    """
    check = "check_fast_forward"
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    cases = [(regime, 1, H, T, D) for regime in REGIMES] + [("random", 2, 1, T - 19, D + 8), ("random", 1, H, 1, D)]
    worst = 0.0
    for regime, B_, H_, T_, D_ in cases:
        q, k, v = make_inputs(regime, B=B_, Hq=H_, T=T_, D=D_, dtype=dtype, device=device, seed=seed + T_)
        case = fmt_case(regime=regime, dtype=dtype, q=(B_, H_, T_, D_))
        got = call(check, fast_forward, (q.clone(), k.clone(), v.clone()), {}, case)
        if isinstance(got, (tuple, list)):
            raise AssertionError(f"{check}: `{name_of(fast_forward)}` should return o alone (one tensor), got "
                                 f"{len(got)} values\n  case: {case}")
        hint = ("keep the given kernel's arithmetic and change where the key loop starts: the first key block to "
                "visit (the loop runs right to left) is the one holding the block's last query, "
                "cdiv(min((pid_m + 1) * BLOCK_M, T), BLOCK_N) blocks from the start; mask loads and stores at T.")
        worst = max(worst, compare(check, got, oracle_attention(q, k, v)[0], TOLERANCE.output[dtype], case, hint,
                                   what="o"))
    print(f"{check}: numerics passed, {len(cases)} cases (regimes {', '.join(REGIMES)}; T = {T}, {T - 19} and 1; "
          f"{str(dtype).replace('torch.', '')} worst relative error {worst:.1e}).")
    full_sweep = math.ceil(T / SWEEP_BLOCK_M) * T * D * H
    try:
        return check_speed(fast_forward, reference_attention, _make_args(seed, 1, H, T, D), points=points,
                           timing=TimingCase(4, 12, 4096, 128), check=check, tiers=FAST_FORWARD_TIERS,
                           full_sweep_loads=full_sweep)
    except NotImplementedError:
        raise not_attempted(check, f"`{name_of(fast_forward)}`") from None
