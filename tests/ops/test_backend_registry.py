"""The one backend registry (fastmem/backends.py) both fused ops dispatch through."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from fastmem import backends
from fastmem.ops import linear_cross_entropy as _  # noqa: F401  (registers the op)

CPU = torch.device("cpu")


@pytest.fixture
def toy_op():
    name = "toy_op_for_registry_test"
    impls = {"triton": SimpleNamespace(tag="triton"), "torch": SimpleNamespace(tag="torch")}
    backends.register_op(name, impls)
    yield name
    backends._REGISTRY.pop(name, None)


def test_linear_cross_entropy_is_registered_fastest_first():
    assert backends.op_backends("linear_cross_entropy") == ("cuda", "triton", "torch")
    impl = backends.implementation("linear_cross_entropy", "torch")
    assert impl.__name__ == "fastmem.ops.cross_entropy.backend_torch" and callable(impl.process_chunk)


def test_module_paths_are_imported_only_when_used(monkeypatch):
    name = "lazy_op_for_registry_test"
    monkeypatch.delitem(sys.modules, "json.tool", raising=False)
    backends.register_op(name, {"torch": "json.tool"})
    try:
        assert "json.tool" not in sys.modules
        assert backends.implementation(name, "torch") is sys.modules["json.tool"]
    finally:
        backends._REGISTRY.pop(name)


def test_choose_backend_auto_and_by_name(toy_op):
    assert backends.choose_backend(toy_op, "auto", CPU) == "torch"  # the CPU never auto-picks the interpreter
    assert backends.choose_backend(toy_op, "torch", CPU) == "torch"
    with pytest.raises(ValueError, match="not implemented for toy_op_for_registry_test"):
        backends.choose_backend(toy_op, "cuda", CPU)
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.choose_backend(toy_op, "tpu", CPU)
    backends.register_op(toy_op, {"cuda": object(), "torch": object()})
    with pytest.raises(RuntimeError, match="cannot run toy_op_for_registry_test on cpu tensors"):
        backends.choose_backend(toy_op, "cuda", CPU)


def test_exclude_removes_a_backend_from_auto_only(toy_op, monkeypatch):
    monkeypatch.setattr(backends, "_backend_runs", lambda backend, device: True)
    gpu = torch.device("cuda")  # a device object only; _backend_runs is stubbed
    assert backends.choose_backend(toy_op, "auto", gpu) == "triton"
    assert backends.choose_backend(toy_op, "auto", gpu, exclude=("triton",)) == "torch"
    # asked for by name, an excluded backend is the op's to refuse with its own message
    assert backends.choose_backend(toy_op, "triton", gpu, exclude=("triton",)) == "triton"


def test_override_implementation_restores_the_original(toy_op):
    replacement = SimpleNamespace(tag="replacement")
    with backends.override_implementation(toy_op, "torch", replacement):
        assert backends.implementation(toy_op, "torch") is replacement
        assert backends.op_backends(toy_op) == ("triton", "torch")
    assert backends.implementation(toy_op, "torch").tag == "torch"


def test_unknown_ops_and_backends_are_clear_errors():
    with pytest.raises(KeyError, match="no op 'nope' is registered"):
        backends.implementation("nope", "torch")
    with pytest.raises(ValueError, match="non-empty subset"):
        backends.register_op("bad", {"tpu": object()})
