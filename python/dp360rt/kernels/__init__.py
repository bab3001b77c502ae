"""Attention kernels. Every fast path has its plain PyTorch twin here; the twin is the CPU path
and the test oracle."""
