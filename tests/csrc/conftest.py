"""Host builds of the CUDA kernels' math (g++ + the CUDA toolkit headers; no GPU)."""

import shutil
from pathlib import Path

import pytest

from tests.csrc import ce_host_kernels, lora_host_kernels
from tests.csrc.cuda_toolchain import cuda_include_dir


@pytest.fixture(scope="session")
def host_toolchain() -> Path:
    """The CUDA include dir for g++ host builds; skips (with the reason) when one is missing."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not found: cannot build the kernels' math for the host")
    include = cuda_include_dir()
    if include is None:
        pytest.skip("no CUDA toolkit headers (cuda_bf16.h) found: set CUDA_HOME")
    return include


@pytest.fixture(scope="session")
def ce_host_library(tmp_path_factory, host_toolchain):
    return ce_host_kernels.build(tmp_path_factory.mktemp("ce_host"), host_toolchain)


@pytest.fixture
def ce_host(ce_host_library):
    return ce_host_kernels.CeHostKernels(ce_host_library)


@pytest.fixture(scope="session")
def lora_host_library(tmp_path_factory, host_toolchain):
    return lora_host_kernels.build(tmp_path_factory.mktemp("lora_host"), host_toolchain)


@pytest.fixture
def lora_host(lora_host_library):
    return lora_host_kernels.LoraHostKernels(lora_host_library)
