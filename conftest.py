"""Test-suite set-up shared by every test (pytest loads this file before any test module).

On a machine without a CUDA GPU the Triton kernels in `kernels/` run through Triton's interpreter, which must be
switched on before `triton` is first imported; the variable is inherited by the scripts the smoke tests launch.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The unit tests use tiny tensors: one intra-op thread avoids oversubscribing a small, possibly busy, CPU.
torch.set_num_threads(1)

# The scripts live at the repository root; make `import sdac`, `import kernels` work from tests/.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
