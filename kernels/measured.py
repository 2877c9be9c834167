"""GPU speed-ups of the fused chain over the scripts' own PyTorch loop, as measured by `python -m kernels.gpu_check`.

`prefer_triton` (what the scripts' `--kernels auto` asks) says yes only for a configuration listed here. A row is added
by hand from a gpu_check table: the device name exactly as `torch.cuda.get_device_name()` prints it, the hidden width,
the precision ("ieee", "tf32" or "bf16"), the smallest wall-time speed-up over the PyTorch loop across the scripts'
call shapes of that width and precision (sampling and training), the date and the command. Nothing has been measured
on a GPU yet, so the table is empty and `auto` means PyTorch everywhere.
"""

from __future__ import annotations

import torch

MEASURED: list[dict] = [
    # {"device": "NVIDIA H100 80GB HBM3", "hidden": 256, "precision": "tf32", "speedup": 1.0,
    #  "date": "YYYY-MM-DD", "command": "python -m kernels.gpu_check"},
]


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def prefer_triton(device: torch.device, hidden_dim: int, precision: str) -> bool:
    """True only when MEASURED has a row for this GPU model, hidden width and precision with a speed-up above 1."""
    device = torch.device(device)
    if device.type != "cuda" or not MEASURED:  # nothing recorded: no GPU query either
        return False
    name = _device_name(device)
    return any(r["device"] == name and r["hidden"] == hidden_dim and r["precision"] == precision
               and r["speedup"] > 1.0 for r in MEASURED)
