"""Triton kernels for the GPU path, each beside a launcher and a torch reference.

Tested on the CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""
