"""Where the linear algebra runs."""

from __future__ import annotations

import torch

from .errors import NanPeftError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """"auto" (or None) picks CUDA when available, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise NanPeftError(f"unknown device {device!r} ({error})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise NanPeftError(f"device {device!r} asked for, but CUDA is not available here")
    return resolved
