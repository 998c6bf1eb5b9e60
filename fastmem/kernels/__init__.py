"""Kernels: Triton (fastmem.kernels.triton) and CUDA C++ (csrc/). They know nothing of autograd."""
