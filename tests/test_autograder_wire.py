"""autograder.wire, the codec between the grader and the learner's kernel: what travels comes back as it left, learner
names and kept objects resolve only where they live (the kernel side passes them in), and what cannot travel is
refused."""
import os

import numpy as np
import pytest
import torch

from autograder import wire


def roundtrip(value, tmp_path, **where):
    path = tmp_path / "value.pt"
    path.unlink(missing_ok=True)  # a message goes only to a new file
    wire.save(value, path)
    return wire.load(path, **where)


def test_values_come_back_as_they_left(tmp_path):
    value = {"t": torch.arange(3.0).requires_grad_(), "a": np.ones((2, 2)), "s": np.float32(1.5),
             "d": torch.device("cpu"), "nested": [1, (2.0, "x"), None], "dtype": torch.bfloat16, 7: True}
    back = roundtrip(value, tmp_path)
    assert torch.equal(back["t"], value["t"]) and back["t"].requires_grad
    assert isinstance(back["a"], np.ndarray) and np.array_equal(back["a"], value["a"])
    assert isinstance(back["s"], np.float32) and back["s"] == 1.5
    assert back["d"] == torch.device("cpu") and back["dtype"] is torch.bfloat16 and back[7] is True
    assert back["nested"] == [1, (2.0, "x"), None]


def test_installed_functions_travel_by_name_to_the_kernel_only(tmp_path):
    sent = [torch.nn.functional.logsigmoid]
    assert roundtrip(sent, tmp_path, imports=True)[0] is torch.nn.functional.logsigmoid  # the kernel's side
    with pytest.raises(wire.WireError, match="imports nothing"):  # the grader's side imports nothing it is told
        wire.load(tmp_path / "value.pt")


def test_a_message_is_written_only_to_a_new_file(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (tmp_path / "link.pt").symlink_to(victim)
    with pytest.raises(FileExistsError):
        wire.save([1], tmp_path / "link.pt")
    assert victim.read_text() == "keep"


def test_a_message_is_read_only_from_a_bounded_regular_file(tmp_path):
    os.mkfifo(tmp_path / "fifo.pt")
    with pytest.raises(wire.WireError, match="not a regular file"):
        wire.load(tmp_path / "fifo.pt")  # and does not block
    wire.save(torch.zeros(1000), tmp_path / "big.pt")
    with pytest.raises(wire.WireError, match="more than"):
        wire.load(tmp_path / "big.pt", max_bytes=1000)
    (tmp_path / "link.pt").symlink_to(tmp_path / "big.pt")
    with pytest.raises(wire.WireError, match="cannot be opened"):
        wire.load(tmp_path / "link.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(wire.WireError, match="not a message"):
        wire.load(tmp_path / "junk.pt")


def test_a_tensor_larger_than_a_message_may_carry_is_refused_before_a_copy(tmp_path):
    wire.save(torch.zeros(1).expand(wire.MAX_TENSOR_BYTES // 4 + 1), tmp_path / "view.pt")  # a few bytes on disk
    assert (tmp_path / "view.pt").stat().st_size < 10_000
    with pytest.raises(wire.WireError, match="larger than"):
        wire.load(tmp_path / "view.pt")


def test_learner_names_and_handles_resolve_only_where_they_live(tmp_path):
    class Learner:  # what a proxy looks like to the codec
        learner_name = "weight_matrix"

    class Kept:
        remote_handle = 3

    def weight_matrix():
        return None

    kept = object()
    sent = {"fn": Learner(), "obj": Kept()}
    here = roundtrip(sent, tmp_path)
    assert here == {"fn": {"__learner__": "weight_matrix"}, "obj": {wire.REMOTE: 3}}
    there = roundtrip(sent, tmp_path, namespace={"weight_matrix": weight_matrix}, objects={3: kept})
    assert there["fn"] is weight_matrix and there["obj"] is kept


def test_what_cannot_travel_is_refused(tmp_path):
    with pytest.raises(TypeError, match="cannot pass a"):
        wire.save(object(), tmp_path / "value.pt")


def test_tensors_in_and_replace_tensors_agree():
    value = {"a": [torch.zeros(1), 2, (torch.ones(2),)], "b": torch.full((3,), 5.0)}
    tensors = wire.tensors_in(value)
    assert [t.numel() for t in tensors] == [1, 2, 3]
    replaced = wire.replace_tensors(value, iter([t + 1 for t in tensors]))
    assert [float(t.sum()) for t in wire.tensors_in(replaced)] == [1.0, 4.0, 18.0] and replaced["a"][1] == 2
