"""The checks of lesson 09 (sb_ref.testing.lessons.lesson09): the lesson's solutions pass with a one-line verdict, each
typical mistake fails with a message that names it, a stub is "not attempted yet", and nothing reaches stderr."""
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sb_ref
from sb_ref.testing.lessons import lesson09, references

BIT0, BIT1, WRITE, IGNORE, READ = 0, 1, 2, 3, 4
P_WRITE, P_READ = 0.1, 0.2

# ------------------------------------------------------------------------------------------------- right answers


def flip_flop_batch(batch, length, generator, p_write=P_WRITE, p_read=P_READ, rand=None):
    n = length // 2
    u = torch.rand(batch, n, generator=generator) if rand is None else rand(batch, n)
    instr = torch.where(u < p_write, WRITE, torch.where(u < p_write + p_read, READ, IGNORE))
    instr[:, 0] = WRITE
    bits = torch.randint(0, 2, (batch, n), generator=generator)
    last_write = torch.where(instr == WRITE, torch.arange(n), 0).cummax(dim=1).values
    bits = torch.where(instr == READ, bits.gather(1, last_write), bits)
    tokens = torch.stack([instr, bits], dim=2).reshape(batch, length)
    read_mask = torch.stack([torch.zeros_like(instr, dtype=torch.bool), instr == READ], dim=2).reshape(batch, length)
    return tokens, read_mask


def rope(x, positions, base=10000.0):
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = positions.to(torch.float64)[:, None] * theta[None, :]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


def rope_stub(x, positions, base=10000.0):
    raise NotImplementedError("rope: not written yet (see the task above)")


class SoftmaxRopeAttention(references.SoftmaxRopeAttention):
    """The notebook's softmax + RoPE attention: the checks' reference module with the learner's ``rope``."""

    rope = staticmethod(rope)


class Block(nn.Module):
    attention_classes = {"stick_breaking": sb_ref.StickBreakingSelfAttention, "softmax_rope": SoftmaxRopeAttention}

    def __init__(self, dim, num_heads, attention):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = self.attention_classes[attention](dim, num_heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))


class TinyLM(nn.Module):
    block_class = Block

    def __init__(self, attention, vocab_size=5, dim=64, num_heads=4, num_layers=2):
        super().__init__()
        self.attention = attention
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(self.block_class(dim, num_heads, attention) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = x + block.attn(block.norm1(x))
            x = x + block.mlp(block.norm2(x))
        return self.head(self.norm(x))


def evaluate(model, tokens, read_mask):
    with torch.no_grad():
        logits = model(tokens)
    hit = logits[:, :-1].argmax(dim=-1) == tokens[:, 1:]
    return hit[read_mask[:, 1:]].float().mean().item()


RIGHT = {"check_flip_flop_batch": flip_flop_batch, "check_rope": rope, "check_tiny_lm": TinyLM,
         "check_evaluate": evaluate}


def failure(name, fn, **kwargs):
    with pytest.raises(AssertionError) as info:
        getattr(lesson09, name)(fn, **kwargs)
    return str(info.value)


def assert_parts(message, *parts):
    for part in parts:
        assert part in message, (part, message)


# ------------------------------------------------------------------------------------------------------- general


def test_all_lists_the_checks():
    assert set(lesson09.__all__) == set(RIGHT)


@pytest.mark.parametrize("name", sorted(RIGHT))
def test_right_answer_passes_quietly(name, capfd):
    result = getattr(lesson09, name)(RIGHT[name])
    out, err = capfd.readouterr()
    assert result is None
    assert out.startswith(f"{name}: passed") and out.count("\n") == 1, out
    assert err == ""


@pytest.mark.parametrize("name", sorted(RIGHT))
def test_stub_is_not_attempted(name, capfd):
    def stub(*args, **kwargs):
        raise NotImplementedError("my_function: not written yet (see the task above)")

    if name == "check_tiny_lm":
        class stub(TinyLM):  # noqa: N801 (the given constructor, forward still a stub)
            def forward(self, tokens):
                raise NotImplementedError("TinyLM.forward: not written yet")

    message = failure(name, stub)
    assert "not attempted yet" in message and name in message
    assert capfd.readouterr().err == ""


def test_hidden_variants_pass(capfd):
    lesson09.check_flip_flop_batch(flip_flop_batch, seed=9, sizes=((5, 34), (1, 4), (2, 200)))
    lesson09.check_rope(rope, seed=5, cases=(((2, 11, 6), "shuffled", torch.float64),
                                             ((1, 3, 4, 10), "offset", torch.float32)))
    lesson09.check_tiny_lm(TinyLM, seed=3, configs=[dict(dim=24, num_heads=3, num_layers=3, B=3, T=9)])
    lesson09.check_evaluate(evaluate, seed=4, sizes=((2, 100), (32, 30)))
    out, err = capfd.readouterr()
    assert out.count("passed") == 4 and err == ""


def test_learner_output_to_stderr_is_silenced(capfd):
    def noisy(x, positions, base=10000.0):
        print("debugging", file=sys.stderr)
        return rope(x, positions, base)

    lesson09.check_rope(noisy)
    assert capfd.readouterr().err == ""


# ------------------------------------------------------------------------------------------------- flip_flop_batch


def test_flip_flop_global_random_state():
    message = failure("check_flip_flop_batch",
                      lambda b, n, g: flip_flop_batch(b, n, g, rand=lambda *shape: torch.rand(*shape)))
    assert_parts(message, "seeded alike gave different batches", "generator=generator")


def test_flip_flop_first_instruction_not_a_write():
    def no_first_write(batch, length, generator):
        tokens, mask = flip_flop_batch(batch, length, generator)
        tokens[:, 0] = IGNORE
        return tokens, mask

    assert_parts(failure("check_flip_flop_batch", no_first_write), "starts with token 3, not a write",
                 "first instruction is always a write")


def test_flip_flop_read_bits_random_or_from_the_first_write():
    def random_reads(batch, length, generator):
        n = length // 2
        u = torch.rand(batch, n, generator=generator)
        instr = torch.where(u < P_WRITE, WRITE, torch.where(u < P_WRITE + P_READ, READ, IGNORE))
        instr[:, 0] = WRITE
        bits = torch.randint(0, 2, (batch, n), generator=generator)
        tokens = torch.stack([instr, bits], dim=2).reshape(batch, length)
        mask = torch.stack([torch.zeros_like(instr, dtype=torch.bool), instr == READ], 2).reshape(batch, length)
        return tokens, mask

    def first_write_reads(batch, length, generator):
        tokens, mask = random_reads(batch, length, generator)
        tokens[:, 1::2] = torch.where(tokens[:, 0::2] == READ, tokens[:, 1:2], tokens[:, 1::2])
        return tokens, mask

    for wrong in (random_reads, first_write_reads):
        message = failure("check_flip_flop_batch", wrong)
        assert_parts(message, "the read at position", "but the last write before it (position",
                     "sequence ", "most recent write", "case: batch=")


def test_flip_flop_mask_on_the_instruction():
    def mask_on_r(batch, length, generator):
        tokens, mask = flip_flop_batch(batch, length, generator)
        return tokens, tokens == READ

    assert_parts(failure("check_flip_flop_batch", mask_on_r), "read_mask[", "BIT positions that follow an 'r'")


def test_flip_flop_wrong_probabilities_and_types():
    message = failure("check_flip_flop_batch", lambda b, n, g: flip_flop_batch(b, n, g, p_write=1 / 3, p_read=1 / 3))
    assert_parts(message, "wrong frequencies", "write 0.3", "expected about write 0.100, read 0.200, ignore 0.700")
    message = failure("check_flip_flop_batch", lambda b, n, g: (flip_flop_batch(b, n, g)[0].float(),
                                                                flip_flop_batch(b, n, g)[1]))
    assert_parts(message, "tokens should be integers", "torch.float32")
    message = failure("check_flip_flop_batch", lambda b, n, g: flip_flop_batch(b, n, g)[0])
    assert_parts(message, "should return 2 values (tokens, read_mask)")


def test_flip_flop_instructions_and_bits_swapped():
    def swapped(batch, length, generator):
        tokens, mask = flip_flop_batch(batch, length, generator)
        return tokens.view(batch, -1, 2).flip(-1).reshape(batch, length), mask

    assert_parts(failure("check_flip_flop_batch", swapped), "must hold an instruction", "even positions")


# ------------------------------------------------------------------------------------------------------------ rope


def test_rope_halves_layout():
    def halves(x, positions, base=10000.0):
        d = x.shape[-1]
        theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        angle = positions.to(torch.float64)[:, None] * theta
        cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)

    assert_parts(failure("check_rope", halves), "rope(x, positions) is wrong for", "pairs x[m] with x[m + d/2]",
                 "worst entry at index")


def test_rope_ignores_the_positions():
    message = failure("check_rope", lambda x, positions, base=10000.0: rope(x, torch.arange(x.shape[-2]), base))
    assert_parts(message, "positions=(100, 101", "rotate by the positions you are given")


def test_rope_float32_angles():
    def float32_angles(x, positions, base=10000.0):
        d = x.shape[-1]
        theta = base ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
        angle = positions.float()[:, None] * theta
        cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)

    assert_parts(failure("check_rope", float32_angles), "dtype=float64", "nearly right", "angles positions * theta_m in float64")


def test_rope_wrong_direction_and_dtype():
    message = failure("check_rope", lambda x, positions, base=10000.0: rope(x, -positions, base))
    assert_parts(message, "the other way")
    message = failure("check_rope", lambda x, positions, base=10000.0: rope(x.double(), positions, base))
    assert_parts(message, "returned torch.float64 for torch.float32 input")


def test_rope_that_is_no_rotation_breaks_the_relative_property():
    def scaled(x, positions, base=10000.0):
        d = x.shape[-1]
        theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        angle = (positions.to(torch.float64)[:, None] * theta).repeat_interleave(2, -1)
        return x * angle.cos().to(x.dtype)

    assert_parts(failure("check_rope", scaled), "should depend only on the offset i - j = 5", "dot products")


# ---------------------------------------------------------------------------------------------------------- TinyLM


class WithPositionEmbedding(TinyLM):
    def forward(self, tokens):
        T, dim = tokens.shape[1], self.embed.embedding_dim
        angle = torch.arange(T, dtype=torch.float64)[:, None] / 10000 ** (torch.arange(dim) / dim)
        x = self.embed(tokens) + angle.sin().to(self.embed.weight.dtype)
        for block in self.blocks:
            x = x + block.attn(block.norm1(x))
            x = x + block.mlp(block.norm2(x))
        return self.head(self.norm(x))


class PostNorm(TinyLM):
    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block.norm1(x + block.attn(x))
            x = block.norm2(x + block.mlp(x))
        return self.head(self.norm(x))


class LooksAhead(TinyLM):
    def forward(self, tokens):
        return super().forward(tokens) + 0.1 * self.embed(tokens).mean(1, keepdim=True).sum(-1, keepdim=True)


class NoHead(TinyLM):
    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = x + block.attn(block.norm1(x))
            x = x + block.mlp(block.norm2(x))
        return self.norm(x)


def test_tiny_lm_mistakes():
    assert_parts(failure("check_tiny_lm", WithPositionEmbedding), "one repeated token should give the same logits",
                 "add no positional encoding", "attention=stick_breaking")
    assert_parts(failure("check_tiny_lm", PostNorm), "the output is wrong for", "pre-norm residual blocks")
    assert_parts(failure("check_tiny_lm", LooksAhead), "changing the tokens at positions >= 6 changed the logits",
                 "causal")
    assert_parts(failure("check_tiny_lm", NoHead), "the logits have shape (2, 12, 32), expected", "(2, 12, 5)")


def test_tiny_lm_check_does_not_need_the_learners_rope():
    class BlockWithStubRope(Block):
        attention_classes = dict(Block.attention_classes,
                                 softmax_rope=type("Stubbed", (SoftmaxRopeAttention,), {"rope": staticmethod(rope_stub)}))

    class Model(TinyLM):
        block_class = BlockWithStubRope

    lesson09.check_tiny_lm(Model)


def test_tiny_lm_needs_the_given_constructor():
    class Renamed(TinyLM):
        def __init__(self, attention, vocab_size=5, dim=64, num_heads=4, num_layers=2):
            super().__init__(attention, vocab_size, dim, num_heads, num_layers)
            self.layers = self.blocks
            del self.blocks

        def forward(self, tokens):
            x = self.embed(tokens)
            for block in self.layers:
                x = x + block.attn(block.norm1(x))
                x = x + block.mlp(block.norm2(x))
            return self.head(self.norm(x))

    assert_parts(failure("check_tiny_lm", Renamed), "keep the constructor you were given")


# -------------------------------------------------------------------------------------------------------- evaluate


def test_evaluate_mistakes():
    def no_shift(model, tokens, read_mask):
        with torch.no_grad():
            return (model(tokens).argmax(-1) == tokens)[read_mask].float().mean().item()

    def every_position(model, tokens, read_mask):
        with torch.no_grad():
            return (model(tokens)[:, :-1].argmax(-1) == tokens[:, 1:]).float().mean().item()

    def per_sequence(model, tokens, read_mask):
        with torch.no_grad():
            hit = (model(tokens)[:, :-1].argmax(-1) == tokens[:, 1:]) & read_mask[:, 1:]
        reads = read_mask[:, 1:].sum(1)
        return (hit.sum(1)[reads > 0] / reads[reads > 0]).mean().item()

    def per_sequence_tensor(model, tokens, read_mask):
        with torch.no_grad():
            hit = (model(tokens)[:, :-1].argmax(-1) == tokens[:, 1:]) & read_mask[:, 1:]
        return hit.sum(1) / read_mask.sum(1).clamp_min(1)

    assert_parts(failure("check_evaluate", no_shift), "accuracy 0.000000, expected 1.000000",
                 "predicts the last written bit", "the token at t + 1")
    assert_parts(failure("check_evaluate", every_position), "count only the read positions")
    assert_parts(failure("check_evaluate", per_sequence), "not per sequence first")
    assert_parts(failure("check_evaluate", per_sequence_tensor), "should return a number")


def test_evaluate_accepts_a_scalar_tensor():
    lesson09.check_evaluate(lambda model, tokens, read_mask: torch.tensor(evaluate(model, tokens, read_mask)))
    assert math.isclose(references.flip_flop_accuracy(torch.zeros(1, 2, 5), torch.tensor([[READ, 0]]),
                                                        torch.tensor([[False, True]])), 1.0)
