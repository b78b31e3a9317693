"""Accelerate training scripts (installed as ``diffad.training``; run them as scripts or via ``diffad train``)."""
