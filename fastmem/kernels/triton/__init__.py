"""Triton kernels. Importing this package requires triton."""
