"""Triton kernels, one file per op family. Imported lazily by ``fastrlhf._backend``."""
