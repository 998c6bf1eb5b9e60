"""backend="auto" never starts the minutes-long nvcc JIT build inside a training step: it uses a
prebuilt or already-cached extension, and otherwise says once how to build it. backend="cuda",
`fastmem audit --build-cuda`, `fastmem.build_cuda_extension()` and FASTMEM_CUDA=1 do build.

Runs on a CPU-only torch: the build itself is replaced by a fake, the policy around it is real.
"""

from __future__ import annotations

import logging
import types

import pytest
import torch
import torch.utils.cpp_extension

import fastmem
from fastmem import _cuda_build, backends

CUDA = torch.device("cuda")  # a device object only: nothing runs on it here
PREFERENCE = ("cuda", "triton", "torch")


@pytest.fixture
def buildable(monkeypatch, tmp_path):
    """A machine where a JIT build could run (no prebuilt extension), with the compiler faked:
    returns the list of builds started."""
    monkeypatch.delenv("FASTMEM_CUDA", raising=False)
    monkeypatch.setattr(_cuda_build, "jit_build_blocker", lambda: None)
    monkeypatch.setattr(_cuda_build, "_said_not_built", False)
    monkeypatch.setattr(backends, "triton_installed", lambda: True)
    monkeypatch.setattr(_cuda_build, "_stamp_path", lambda: tmp_path / _cuda_build.STAMP_NAME)
    builds = []

    def fake_load(**kwargs):  # torch.utils.cpp_extension.load: the part that runs nvcc
        builds.append(kwargs["name"])
        return types.ModuleType(kwargs["name"])

    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
    _cuda_build.load_cuda_extension.cache_clear()
    yield builds
    _cuda_build.load_cuda_extension.cache_clear()


def test_auto_never_builds_and_says_how_once(buildable, caplog):
    with caplog.at_level(logging.WARNING, logger="fastmem"):
        for _ in range(3):  # three training steps
            assert backends.resolve_backend("op", "auto", CUDA, PREFERENCE) == "triton"
    assert buildable == []
    said = [r.getMessage() for r in caplog.records if "not built" in r.getMessage()]
    assert len(said) == 1 and "fastmem audit --build-cuda" in said[0] and "build_cuda_extension()" in said[0]


def test_backend_cuda_by_name_builds_once_then_auto_uses_it(buildable):
    assert backends.resolve_backend("op", "cuda", CUDA, PREFERENCE) == "cuda"
    assert backends.resolve_backend("op", "auto", CUDA, PREFERENCE) == "cuda"
    assert buildable == [_cuda_build.JIT_MODULE_NAME]


def test_explicit_build_is_remembered_across_processes(buildable):
    module = fastmem.build_cuda_extension()
    assert module.__name__ == _cuda_build.JIT_MODULE_NAME and len(buildable) == 1
    assert _cuda_build.jit_build_is_current()
    # A later process: nothing loaded yet, the stamp says the cached build matches the sources,
    # so auto loads it (torch's loader finds nothing to compile).
    _cuda_build.load_cuda_extension.cache_clear()
    assert backends.resolve_backend("op", "auto", CUDA, PREFERENCE) == "cuda"


def test_a_changed_source_is_not_current(buildable, monkeypatch, tmp_path):
    fastmem.build_cuda_extension()
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    for path in _cuda_build.CSRC_DIR.iterdir():
        if path.is_file():
            (csrc / path.name).write_bytes(path.read_bytes())
    assert _cuda_build.sources_digest(csrc) == _cuda_build.sources_digest()
    (csrc / "lora_math.h").write_text((csrc / "lora_math.h").read_text() + "\n// edited\n")
    assert _cuda_build.sources_digest(csrc) != _cuda_build.sources_digest()
    monkeypatch.setattr(_cuda_build, "sources_digest", lambda csrc_dir=csrc: "another digest")
    _cuda_build.load_cuda_extension.cache_clear()
    assert not _cuda_build.jit_build_is_current()
    assert backends.resolve_backend("op", "auto", CUDA, PREFERENCE) == "triton"  # stale: no rebuild in a step
    assert len(buildable) == 1


def test_fastmem_cuda_1_allows_building_on_first_use(buildable, monkeypatch):
    monkeypatch.setenv("FASTMEM_CUDA", "1")
    assert backends.resolve_backend("op", "auto", CUDA, PREFERENCE) == "cuda"
    assert len(buildable) == 1


def test_auto_on_the_cpu_never_probes(buildable):
    assert backends.resolve_backend("op", "auto", torch.device("cpu"), PREFERENCE) == "torch"
    assert buildable == []


@pytest.mark.skipif(bool(torch.version.cuda), reason="checks the refusal of a CPU-only torch")
def test_audit_build_cuda_says_why_it_cannot(capsys, monkeypatch):
    from fastmem.cli import main

    monkeypatch.delenv("FASTMEM_CUDA", raising=False)
    _cuda_build.load_cuda_extension.cache_clear()
    try:
        assert main(["audit", "--build-cuda"]) == 1
    finally:
        _cuda_build.load_cuda_extension.cache_clear()
    out = capsys.readouterr().out
    assert "fastmem audit --build-cuda: the fastmem CUDA extension is unavailable" in out
    assert "is not a CUDA build" in out


def test_auto_on_a_gpu_device_traces_whole_under_compile(buildable):
    """Under torch.compile(fullgraph=True) on a GPU, the probe (imports, extension caches, the
    log line) runs once at trace time as a constant; it neither breaks the graph nor builds."""

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x):
        chosen = backends.resolve_backend("op", "auto", CUDA, PREFERENCE)
        return x * (2.0 if chosen == "triton" else 3.0)

    torch._dynamo.reset()
    assert torch.equal(step(torch.ones(2)), torch.full((2,), 2.0))
    assert buildable == []
