"""The reference answers the lessons' checks compare against, and the models they hand the learner's code.

Everything here is float64 and written for clarity, not speed; the checks' tolerances are measured against it.

- lesson 02: :func:`good_attention` and :func:`broken_attention` (a correct and a wrong backward, for gradcheck);
- lesson 03: :func:`apply_remainder`;
- lesson 04: :func:`segment_attention` (the attention of one key segment, for the associative combine);
- lesson 05: :func:`reverse_exclusive` (of rows of any length, 0 included);
- lesson 07: :func:`tile_gradients` (dl and dz of one tile by the formulas, or with a typical mistake) and
  :func:`attention_gradients` (the op's float64 outputs and gradients);
- lesson 09: the flip-flop task (:data:`VOCAB_SIZE` ..., :func:`flip_flop`, :func:`flip_flop_accuracy`), RoPE
  (:func:`rope`), the softmax + RoPE attention (:class:`SoftmaxRopeAttention`), the lesson's wiring of a tiny model
  (:func:`tiny_lm_forward`), and models whose answers are known (:class:`RuleModel`, :data:`RULES`).
"""
import torch
import torch.nn.functional as F
from torch import nn

from ...attention import stick_breaking_attention
from ...weights import reverse_exclusive_cumsum, stick_breaking_weights
from .harness import quiet


# --------------------------------------------------------------------------------------------------------------
# lesson 02: a correct and a wrong backward (for gradcheck), and the reference attention with its gradients

def softmax_attention(q, k, v, scale=None, attend_current=False):
    """A correct, differentiable attention that is not the lesson's (causal softmax), and a second output standing
    in for rem: what lesson 02's gradcheck exercise is handed, so that the function it is given answers nothing."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    z = scale * q @ k.transpose(-1, -2)
    T = z.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=z.device).tril()
    return z.masked_fill(~causal, float("-inf")).softmax(-1) @ v, torch.sigmoid(z).mean(-1)


class BrokenBackward(torch.autograd.Function):
    """:func:`softmax_attention` with a backward that is wrong on purpose (every gradient halved)."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        return softmax_attention(q, k, v)

    @staticmethod
    def backward(ctx, do, drem):
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_() for x in ctx.saved_tensors]
            grads = torch.autograd.grad(softmax_attention(*leaves), leaves, (do, drem))
        return tuple(0.5 * g for g in grads)


def broken_attention(q, k, v, scale=None, attend_current=False):
    return BrokenBackward.apply(q, k, v)


def good_attention(q, k, v, scale=None, attend_current=False):
    """A correct, differentiable stick-breaking attention (plain autograd through the log-space weights)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    z = scale * q @ k.transpose(-1, -2)
    T = z.shape[-1]
    seen = torch.ones(T, T, dtype=torch.bool, device=z.device).tril(0 if attend_current else -1)
    rem = F.logsigmoid(-z).masked_fill(~seen, 0.0).sum(-1).exp()
    return stick_breaking_weights(z, attend_current=attend_current) @ v, rem


# --------------------------------------------------------------------------------------------------------------
# lesson 03: the remainder

def apply_remainder(o, rem, v, mode, bias):
    """``o`` plus the remainder as ``mode`` says ("self", "bias" or "none"), with GQA (v has Hk heads)."""
    B, Hq, T, Dv = o.shape
    Hk = v.shape[1]
    r = rem.unsqueeze(-1)
    if mode == "self":
        return o + r * v.repeat_interleave(Hq // Hk, dim=1)
    if mode == "bias":
        return o + r * bias[None, :, None, :]
    return o


# --------------------------------------------------------------------------------------------------------------
# lesson 04: one key segment

def segment_attention(q, k, v, start, end, *, scale=None, attend_current=False):
    """Stick-breaking attention of every query over the keys in ``[start, end)`` only (float64).

    Returns ``(o, log_rem)``: the segment's output and the sum of ``log(1 - beta)`` over the segment's visible keys.
    Two segments (``near`` closer to the query than ``far``) combine as ``o = o_near + exp(S_near) * o_far``.
    """
    q, k, v = (x.detach().double() for x in (q, k, v))
    T = q.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    z = scale * q @ k.transpose(-1, -2)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    seen = ((j <= i) if attend_current else (j < i)) & (j >= start) & (j < end)
    log_keep = F.logsigmoid(-z).masked_fill(~seen, 0.0)
    log_A = F.logsigmoid(z) + reverse_exclusive_cumsum(log_keep)
    return log_A.exp().masked_fill(~seen, 0.0) @ v, log_keep.sum(-1)


# --------------------------------------------------------------------------------------------------------------
# lesson 05: reverse exclusive sums of rows

def reverse_exclusive(x):
    """out[:, j] = sum of x[:, k] over k > j (float64)."""
    out = torch.zeros_like(x)
    out[..., :-1] = x.flip(-1).cumsum(-1).flip(-1)[..., 1:]
    return out


# --------------------------------------------------------------------------------------------------------------
# lesson 07: gradients

def visible(T, attend_current):
    """The (T, T) mask of the keys each query sees."""
    return torch.ones(T, T, dtype=torch.bool).tril(0 if attend_current else -1)


def tile_gradients(z, v, dO, g, attend_current, variant=None):
    """(dl, dz) of logits z (..., T, T) in float64 by the formulas; ``variant`` names a typical mistake, to give the
    hint that matches a wrong answer."""
    seen = visible(z.shape[-1], attend_current)
    A = stick_breaking_weights(z, attend_current=attend_current)
    beta = torch.sigmoid(z).masked_fill(~seen, 0.0)
    dl = A * (dO @ v.transpose(-1, -2))
    if variant == "no_A":
        dl = (dO @ v.transpose(-1, -2)).masked_fill(~seen, 0.0)
    C = dl.cumsum(-1) - dl                                   # keys farther than j: j' < j
    if variant == "nearer":
        C = dl.flip(-1).cumsum(-1).flip(-1) - dl             # keys nearer than j: j' > j
    elif variant == "inclusive":
        C = dl.cumsum(-1)
    gg = torch.zeros_like(g) if variant == "no_g" else g
    dz = (dl * (1 - beta) - beta * (C + gg[..., None])).masked_fill(~seen, 0.0)
    return dl, dz


def attention_gradients(q, k, v, dO, dRem, attend_current):
    """float64 (o, rem, dq, dk, dv, delta, g) of the loss (o * dO).sum() + (rem * dRem).sum()."""
    leaves = [x.detach().to("cpu", torch.float64).requires_grad_() for x in (q, k, v)]
    with quiet():
        o, rem = stick_breaking_attention(*leaves, attend_current=attend_current, return_remainder=True,
                                          backend="torch")
        dO64, dRem64 = dO.detach().to("cpu", torch.float64), dRem.detach().to("cpu", torch.float64)
        grads = torch.autograd.grad((o * dO64).sum() + (rem * dRem64).sum(), leaves)
    o, rem = o.detach(), rem.detach()
    return o, rem, *grads, (o * dO64).sum(-1), dRem64 * rem


# --------------------------------------------------------------------------------------------------------------
# lesson 09: flip-flop, RoPE, softmax + RoPE attention, models with known answers

# The flip-flop vocabulary: the two bits are tokens 0 and 1, then the three instructions.
BIT0, BIT1, WRITE, IGNORE, READ = 0, 1, 2, 3, 4
VOCAB_SIZE = 5
P_WRITE, P_READ = 0.1, 0.2  # the lesson's instruction probabilities (after the first, which is always a write)


def flip_flop(batch, length, generator, p_write=P_WRITE, p_read=P_READ):
    """Reference flip-flop batch: ``(tokens, read_mask)``, both (batch, length); instructions at even positions."""
    n = length // 2
    u = torch.rand(batch, n, generator=generator, dtype=torch.float64)
    instr = torch.where(u < p_write, WRITE, torch.where(u < p_write + p_read, READ, IGNORE))
    instr[:, 0] = WRITE
    bits = torch.randint(0, 2, (batch, n), generator=generator)
    bits = torch.where(instr == READ, bits.gather(1, last_write_index(instr == WRITE)), bits)
    tokens = torch.stack([instr, bits], 2).reshape(batch, 2 * n)
    mask = torch.stack([torch.zeros_like(instr, dtype=torch.bool), instr == READ], 2).reshape(batch, 2 * n)
    return tokens, mask


def last_write_index(is_write):
    """Index of the last True at or before each position along dim 1 (0 where there is none)."""
    n = is_write.shape[1]
    return torch.where(is_write, torch.arange(n), 0).cummax(1).values


def rope(x, positions, base=10000.0, pairs="interleaved"):
    """RoPE in float64: pairs (x[2m], x[2m+1]) rotate by positions * base^(-2m/d) (``pairs="halves"``: x[m] with
    x[m + d/2], the other common layout)."""
    x = x.detach().to("cpu", torch.float64)
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = positions.detach().to("cpu", torch.float64)[:, None] * theta[None, :]
    cos, sin = angle.cos(), angle.sin()
    if pairs == "halves":
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)


class SoftmaxRopeAttention(nn.Module):
    """The lesson's causal softmax attention with RoPE (same parameter names), on the reference RoPE (``rope``)."""

    rope = staticmethod(rope)

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        B, T, E = x.shape
        H, d = self.num_heads, self.head_dim
        q, k, v = (p(x).view(B, T, H, d).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        positions = torch.arange(T)
        q, k = self.rope(q, positions).to(x.dtype), self.rope(k, positions).to(x.dtype)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(o.transpose(1, 2).reshape(B, T, E))


class ReferenceTinyLM(nn.Module):
    """The capstone's given ``TinyLM`` constructor (same modules, same parameter names), with the lesson's forward:
    the grader loads the learner's weights into it and computes the logits the learner's model must give."""

    def __init__(self, attention, vocab_size, dim, num_heads, num_layers):
        from ...layer import StickBreakingSelfAttention

        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList()
        for _ in range(num_layers):
            block = nn.Module()
            block.norm1, block.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            block.attn = (StickBreakingSelfAttention(dim, num_heads) if attention == "stick_breaking"
                          else SoftmaxRopeAttention(dim, num_heads))
            block.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
            self.blocks.append(block)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, tokens):
        return tiny_lm_forward(self, tokens)


def tiny_lm_forward(model, tokens):
    """The lesson's wiring, run on the model's own modules: embedding, pre-norm residual blocks, norm, head."""
    x = model.embed(tokens)
    for block in model.blocks:
        x = x + block.attn(block.norm1(x))
        x = x + block.mlp(block.norm2(x))
    return model.head(model.norm(x))


def flip_flop_accuracy(logits, tokens, mask):
    """Accuracy over all read positions of the batch: the logits at t - 1 predict the token at t."""
    hit = logits[:, :-1].argmax(-1) == tokens[:, 1:]
    return float(hit[mask[:, 1:]].double().mean())


class RuleModel(nn.Module):
    """A 'model' whose answers are known: at every 'r' token it puts its logits on the bit that ``rule`` picks
    (a (B, n_pairs) tensor of bits per instruction); at every other position on the 'i' token."""

    def __init__(self, rule):
        super().__init__()
        self.rule = rule
        self.dummy = nn.Parameter(torch.zeros(()))  # so that next(model.parameters()) gives the device

    def forward(self, tokens):
        B, T = tokens.shape
        guess = torch.full((B, T), IGNORE, dtype=torch.long, device=tokens.device)
        instr, bits = tokens[:, 0::2], tokens[:, 1::2]
        guess[:, 0::2] = torch.where(instr == READ, self.rule(instr, bits), IGNORE)
        return 10.0 * F.one_hot(guess, VOCAB_SIZE).float() + 0.0 * self.dummy


def last_write_rule(instr, bits):
    return bits.gather(1, last_write_index(instr == WRITE))


def first_write_rule(instr, bits):
    return bits[:, :1].expand_as(bits)


def zero_rule(instr, bits):
    return torch.zeros_like(bits)


def previous_bit_rule(instr, bits):
    return torch.cat([bits[:, :1], bits[:, :-1]], 1)


#: (what the model does, its rule), for the messages of lesson 09's check_evaluate
RULES = (("predicts the last written bit (always right)", last_write_rule),
         ("always predicts 0", zero_rule),
         ("predicts the first written bit", first_write_rule),
         ("predicts the bit of the previous pair", previous_bit_rule))

