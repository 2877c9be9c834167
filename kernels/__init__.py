"""Fused Triton kernels for the diffusion-policy scripts (see kernels/README.md).

    import kernels
    x0 = kernels.reverse_chain(layers, state, x, temb, betas, order, noise=None, seed=None, clip=1.0,
                               final_noise=False, precision=None)
    kernels.prefer_triton(device, hidden_dim, precision)  # True only where a GPU speed-up is recorded

On a machine without a CUDA GPU the kernels run through Triton's interpreter (slow; for tests). The interpreter must
be chosen before Triton defines the kernels, so this package switches it on when no GPU is present unless the caller
already decided (TRITON_INTERPRET set either way).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .chain import PRECISIONS, reverse_chain  # noqa: E402
from .measured import prefer_triton  # noqa: E402
from .reference import reverse_chain_reference  # noqa: E402

__all__ = ["PRECISIONS", "prefer_triton", "reverse_chain", "reverse_chain_reference"]
