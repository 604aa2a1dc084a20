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


def scalar_argument(
    name: str, value: object, *, read_device: bool
) -> tuple[torch.Tensor | None, float | None]:
    """(the tensor given, or None for a Python number; its value, or None when it lives on
    an accelerator and ``read_device`` is False: reading it there syncs with the host).

    A scalar is a Python number or a one-element floating-point tensor; anything else is a
    TypeError / ValueError naming ``name``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(value).__name__}")
    if not isinstance(value, torch.Tensor):
        return None, float(value)
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.numel() != 1 or value.dim() > 1:
        raise ValueError(f"{name} must be a scalar (0-d tensor), got shape {tuple(value.shape)}")
    if value.device.type != "cpu" and not read_device:
        return value, None
    return value, float(value.detach().reshape(()))


def as_list(value: object) -> tuple[list, bool]:
    """(value as a list, whether it was given as a list or tuple): one teacher or several."""
    if isinstance(value, (list, tuple)):
        return list(value), True
    return [value], False
