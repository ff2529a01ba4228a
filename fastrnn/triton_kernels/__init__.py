"""Triton kernels of the `triton` backend. Import only where Triton is installed."""
