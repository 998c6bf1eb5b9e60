"""Finding / JIT-building the CUDA extension (fastmem/_cuda_build.py) and how backend dispatch
uses it, on a machine without a CUDA torch: clear reasons, fallbacks, no needless builds."""

from __future__ import annotations

import pytest
import torch

import fastmem
from fastmem import _cuda_build, backends

CUDA = torch.device("cuda")  # a device object only: nothing runs on it here


@pytest.fixture
def fresh_loader():
    _cuda_build.load_cuda_extension.cache_clear()
    yield
    _cuda_build.load_cuda_extension.cache_clear()


def test_sources_are_every_kernel_file_and_the_binding():
    names = [p.name for p in _cuda_build.cuda_sources()]
    assert names[-1] == "bindings.cpp" and "cross_entropy.cu" in names and "lora_linear.cu" in names


@pytest.mark.parametrize("mode,reason", [("0", "FASTMEM_CUDA=0"), ("maybe", "FASTMEM_CUDA must be 0, 1 or auto")])
def test_fastmem_cuda_switch(monkeypatch, fresh_loader, mode, reason):
    monkeypatch.setenv("FASTMEM_CUDA", mode)
    extension = _cuda_build.load_cuda_extension()
    assert extension.module is None and reason in extension.reason


@pytest.mark.skipif(bool(torch.version.cuda), reason="checks the reason given by a CPU-only torch")
def test_cpu_torch_says_why_there_is_no_extension(monkeypatch, fresh_loader):
    monkeypatch.delenv("FASTMEM_CUDA", raising=False)
    extension = _cuda_build.load_cuda_extension()
    assert extension.module is None
    assert "no prebuilt fastmem._cuda_ext" in extension.reason and "is not a CUDA build" in extension.reason


def test_backend_cuda_error_names_the_reason(monkeypatch):
    monkeypatch.setattr(_cuda_build, "load_cuda_extension",
                        lambda: _cuda_build.CudaExtension(None, "nvcc was not found (set CUDA_HOME)"))
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run op on cuda tensors: .*nvcc was not found"):
        backends.resolve_backend("op", "cuda", CUDA, ("cuda", "triton", "torch"))
    with pytest.raises(RuntimeError, match="runs on CUDA tensors only"):
        backends.resolve_backend("op", "cuda", torch.device("cpu"), ("torch", "cuda"))
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        fastmem.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]), backend="cuda")


def test_auto_falls_back_to_triton_then_torch(monkeypatch):
    monkeypatch.setattr(backends, "cuda_extension_loaded", lambda: False)
    monkeypatch.setattr(backends, "triton_installed", lambda: True)
    assert backends.resolve_backend("op", "auto", CUDA, ("cuda", "triton", "torch")) == "triton"
    monkeypatch.setattr(backends, "triton_installed", lambda: False)
    assert backends.resolve_backend("op", "auto", CUDA, ("cuda", "triton", "torch")) == "torch"
    monkeypatch.setattr(backends, "cuda_extension_loaded", lambda: True)
    assert backends.resolve_backend("op", "auto", CUDA, ("cuda", "triton", "torch")) == "cuda"


def test_auto_follows_the_ops_preference_order(monkeypatch):
    monkeypatch.setattr(backends, "cuda_extension_loaded", lambda: True)
    monkeypatch.setattr(backends, "triton_installed", lambda: True)
    assert backends.resolve_backend("op", "auto", CUDA, ("triton", "cuda", "torch")) == "triton"
    assert backends.resolve_backend("op", "auto", CUDA, ("cuda", "triton", "torch")) == "cuda"


def test_ops_without_a_cuda_kernel_never_build_the_extension(monkeypatch):
    def no_build():
        raise AssertionError("the extension was probed for an op without a CUDA kernel")

    monkeypatch.setattr(backends, "cuda_extension_loaded", no_build)
    monkeypatch.setattr(backends, "triton_installed", lambda: True)
    assert backends.resolve_backend("op", "auto", CUDA, ("triton", "torch")) == "triton"
    assert backends.resolve_backend("op", "triton", CUDA, ("triton", "torch")) == "triton"
    assert backends.resolve_backend("op", "auto", torch.device("cpu"), ("cuda", "triton", "torch")) == "torch"


def test_installed_sources_win_over_the_source_tree(tmp_path):
    packaged, tree = tmp_path / "fastmem" / "csrc", tmp_path / "csrc"
    for folder in (packaged, tree):
        folder.mkdir(parents=True)
    (tree / "bindings.cpp").write_text("")
    assert _cuda_build.find_csrc_dir((packaged, tree)) == tree  # a source checkout
    (packaged / "bindings.cpp").write_text("")
    assert _cuda_build.find_csrc_dir((packaged, tree)) == packaged  # an installed wheel
    assert _cuda_build.find_csrc_dir((tmp_path / "nowhere",)) is None


def test_checkout_finds_the_repository_sources():
    assert _cuda_build.CSRC_DIR in (_cuda_build.PACKAGED_CSRC_DIR, _cuda_build.SOURCE_TREE_CSRC_DIR)
    assert (_cuda_build.CSRC_DIR / "bindings.cpp").is_file()
