"""Test-session setup shared by every test file."""

import os

import torch

# Triton kernels run on the CPU through Triton's interpreter when there is no GPU. Triton reads this when a
# kernel is decorated, so it must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
