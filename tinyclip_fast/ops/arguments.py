"""Argument checks shared by the loss ops: features, scalars (scales, biases), teacher lists."""

from __future__ import annotations

import torch


def check_features(name: str, tensor: object) -> torch.Tensor:
    """A non-empty 2-D floating-point [batch, dim] tensor, or an error naming ``name``."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D [batch, dim], got shape {tuple(tensor.shape)}")
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(tensor.shape)}")
    return tensor


def scalar_argument(name: str, value: object) -> torch.Tensor | float:
    """A Python number as a float, or a one-element floating-point tensor as given: never
    read, on any device (reading a CUDA value would stall the stream for a host round trip,
    and a read is a graph break for torch.compile). Anything else is a TypeError /
    ValueError naming ``name``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(value).__name__}")
    if not isinstance(value, torch.Tensor):
        return float(value)
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.numel() != 1 or value.dim() > 1:
        raise ValueError(f"{name} must be a scalar (0-d tensor), got shape {tuple(value.shape)}")
    return value


def check_on_device(condition: torch.Tensor, message: str) -> None:
    """Fail with ``message`` where the 0-d bool ``condition`` is False, without reading it
    on the host: on an accelerator the check runs on the device (``torch._assert_async``:
    a false condition fails the stream as a device-side assert, reported at the next
    synchronisation); on the CPU the same call evaluates at once and raises ValueError."""
    try:
        torch._assert_async(condition, message)
    except RuntimeError as err:
        raise ValueError(message) from err


def as_list(value: object) -> tuple[list, bool]:
    """(value as a list, whether it was given as a list or tuple): one teacher or several."""
    if isinstance(value, (list, tuple)):
        return list(value), True
    return [value], False
