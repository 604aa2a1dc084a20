"""Gathering features across data-parallel ranks, with open_clip's semantics.

``gather_with_grad`` makes the all-gather differentiable, so the loss on one rank sends
gradients back to the features of every rank. Without it, only the local slice keeps its
gradient, and only when the full [N, N] problem is scored (not in local-loss mode).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def distributed_world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, or (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_without_grad(tensor: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    gathered = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(gathered, tensor.contiguous())
    return gathered


def gather_features(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    *,
    local_loss: bool = False,
    gather_with_grad: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather [n, d] features from every rank into [world_size * n, d], rank-major."""
    if world_size == 1:
        return image_features, text_features
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"world_size={world_size} but torch.distributed is not initialised; "
            "call torch.distributed.init_process_group first (torchrun does this)"
        )
    if gather_with_grad:
        all_image = torch.cat(dist_fn.all_gather(image_features.contiguous()), dim=0)
        all_text = torch.cat(dist_fn.all_gather(text_features.contiguous()), dim=0)
        return all_image, all_text
    with torch.no_grad():
        gathered_image = _gather_without_grad(image_features, world_size)
        gathered_text = _gather_without_grad(text_features, world_size)
    if not local_loss:
        # Keep the local slice in the graph so this rank's features still get a gradient.
        gathered_image[rank] = image_features
        gathered_text[rank] = text_features
    return torch.cat(gathered_image, dim=0), torch.cat(gathered_text, dim=0)


def gather_teacher_features(
    image_features: torch.Tensor | Sequence[torch.Tensor],
    text_features: torch.Tensor | Sequence[torch.Tensor],
    world_size: int,
) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor | list[torch.Tensor]]:
    """All-gather teacher features; the teacher never receives gradients. An ensemble (lists
    of equal length, one entry per teacher) is gathered teacher by teacher; lists that do not
    pair up are returned as they are, for the loss to refuse with a clear error."""
    listed = [isinstance(t, (list, tuple)) for t in (image_features, text_features)]
    if any(listed):
        if not all(listed) or len(image_features) != len(text_features):
            return image_features, text_features
        pairs = [
            gather_teacher_features(image, text, world_size)
            for image, text in zip(image_features, text_features, strict=True)
        ]
        return [image for image, _ in pairs], [text for _, text in pairs]
    if world_size == 1:
        return image_features.detach(), text_features.detach()
    with torch.no_grad():
        all_image = torch.cat(_gather_without_grad(image_features.detach(), world_size), dim=0)
        all_text = torch.cat(_gather_without_grad(text_features.detach(), world_size), dim=0)
    return all_image, all_text


def gather_rows(tensor: torch.Tensor, world_size: int, *, with_grad: bool) -> torch.Tensor:
    """Every rank's [n, d] tensor stacked rank-major into [world_size * n, d].

    ``with_grad``: differentiable, the backward sums every rank's gradient of this rank's
    slice (what open_clip's SigLipLoss exchanges achieve); otherwise detached.
    """
    if world_size == 1:
        return tensor if with_grad else tensor.detach()
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"world_size={world_size} but torch.distributed is not initialised; "
            "call torch.distributed.init_process_group first (torchrun does this)"
        )
    if with_grad:
        return torch.cat(dist_fn.all_gather(tensor.contiguous()), dim=0)
    with torch.no_grad():
        return torch.cat(_gather_without_grad(tensor.detach(), world_size), dim=0)
