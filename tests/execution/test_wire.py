"""Tensors cross Ray as numpy arrays (`fedsim.execution.wire`): every value, dtype and shape
arrives unchanged, in memory of its own, and what numpy cannot hold goes the usual way."""

from __future__ import annotations

import pytest
import torch

from fedsim.execution import wire


def round_trip(t: torch.Tensor) -> tuple[str, torch.Tensor]:
    kind, payload = wire.to_wire(t)
    return kind, wire.from_wire((kind, payload))


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(32, 1000),
        lambda: torch.randn(64, 100)[10:20],  # rows of a larger tensor: only its own values travel
        lambda: torch.tensor(3.5),
        lambda: torch.zeros(0, 7),
        lambda: torch.arange(10, dtype=torch.int64),
        lambda: torch.rand(20) > 0.5,
        lambda: torch.randn(8, dtype=torch.float64),
        lambda: torch.randn(8, dtype=torch.complex64),
    ],
    ids=["matrix", "rows", "scalar", "empty", "int64", "bool", "float64", "complex"],
)
def test_plain_cpu_tensors_travel_as_numpy_and_arrive_equal_and_writable(make):
    t = make()
    kind, back = round_trip(t)
    assert kind == "numpy"
    assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)
    if t.numel():  # a copy of its own
        assert back.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
    back.add_(1) if back.dtype != torch.bool else back.logical_not_()  # writable
    assert not torch.equal(back, t) or t.numel() == 0


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(5, dtype=torch.bfloat16),
        lambda: torch.randn(5, requires_grad=True),
        lambda: torch.randn(5, dtype=torch.complex64).conj(),
    ],
    ids=["bfloat16", "requires_grad", "conjugate"],
)
def test_what_numpy_cannot_hold_goes_the_usual_way(make):
    t = make()
    kind, back = round_trip(t)
    assert kind == "pickle"
    assert back.dtype == t.dtype and back.requires_grad == t.requires_grad and back.layout == t.layout
    assert torch.equal(back.detach().resolve_conj(), t.detach().resolve_conj())


@pytest.mark.parametrize(
    "make",
    [lambda: torch.randn(64, 100)[:, 10:20], lambda: torch.randn(50, 40).t(), lambda: torch.randn(1, 30).expand(8, 30)],
    ids=["columns", "transposed", "expanded"],
)
def test_tensors_that_are_not_contiguous_keep_their_layout(make):
    t = make()
    kind, back = round_trip(t)
    assert kind == "pickle" and back.stride() == t.stride() and torch.equal(back, t)


def test_a_sparse_tensor_goes_the_usual_way():
    # only routed here: unpickling a sparse tensor defers its check to the next torch.load,
    # which would then warn in whatever test loads next
    assert wire.to_wire(torch.eye(4).to_sparse())[0] == "pickle"


@pytest.mark.integration
def test_through_ray_a_tensor_and_a_nested_result_arrive_equal(ray_cluster, monkeypatch):
    import ray

    wire.register()
    received = []
    plain = wire.from_wire

    def counting(payload):  # what the driver unpickles names wire.from_wire: this one, here
        received.append(payload[0])
        return plain(payload)

    monkeypatch.setattr(wire, "from_wire", counting)

    @ray.remote(num_cpus=1)
    def echo(x):
        from fedsim.execution import wire as w

        w.register()  # as an actor does: what it returns goes out as numpy too
        return {"rows": x["rows"] * 2, "state": [x["state"], None]}

    rows, state = torch.randn(16, 300), torch.arange(5)
    out = ray.get(echo.remote({"rows": rows, "state": state}))
    assert torch.equal(out["rows"], rows * 2) and torch.equal(out["state"][0], state)
    assert out["rows"].dtype == torch.float32 and out["rows"].is_contiguous()
    assert received == ["numpy", "numpy"]  # the task's result came back through wire, as numpy
    assert torch.equal(ray.get(ray.put(rows)), rows)
