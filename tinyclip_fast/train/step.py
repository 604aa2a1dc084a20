"""One training step: forward + backward of a local batch, with exact gradient accumulation.

Gradient accumulation is EXACT for the batch-level loss (GradCache, Gao et al. 2021): the
loss couples every row with every column, so a sum of per-micro-batch losses would be a
different loss. Instead (1) features of every micro-batch without grad, (2) the loss on the
whole batch and its gradient w.r.t. the features and the scale, (3) every micro-batch again
with grad, backpropagating its slice of (2). Pass (3) replays the RNG state of pass (1), so
dropout samples match between the passes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def rng_state(device: torch.device) -> list[torch.Tensor]:
    state = [torch.get_rng_state()]
    if device.type == "cuda":
        state.append(torch.cuda.get_rng_state(device))
    return state


def set_rng_state(state: list[torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    texts: torch.Tensor,
    teacher_features: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    loss_fn: Callable[..., torch.Tensor],
    *,
    micro_batch_size: int,
    autocast: Callable[[], contextlib.AbstractContextManager],
    scaler: torch.amp.GradScaler,
    fixed_scale: torch.Tensor | None = None,
    with_bias: bool = False,
) -> torch.Tensor:
    """Forward + backward of one local batch; returns the detached loss.

    ``model(images, texts) -> (image_features, text_features, exp(logit_scale)[, bias])``
    with L2-normalised features; ``loss_fn(I_s, T_s, a, I_t, T_t, b)``, or with
    ``with_bias`` (the sigmoid family) ``loss_fn(I_s, T_s, a, c, *teacher_features)`` with the
    model's logit bias c. A batch larger than ``micro_batch_size`` takes the GradCache path
    (module docstring): the same gradients as the whole batch at once, within floating-point
    rounding.
    """
    n = images.shape[0]
    if micro_batch_size >= n:
        with autocast():
            image_f, text_f, scale, *bias = model(images, texts)
            scale = scale if fixed_scale is None else fixed_scale
            logit_params = (scale, *_bias(bias, with_bias))
            loss = loss_fn(image_f, text_f, *logit_params, *teacher_features)
        scaler.scale(loss).backward()
        return loss.detach()

    raw = model.module if isinstance(model, DistributedDataParallel) else model
    device = images.device
    slices = [slice(s, s + micro_batch_size) for s in range(0, n, micro_batch_size)]
    rng_states, image_parts, text_parts = [], [], []
    with torch.no_grad(), autocast():
        for part in slices:
            rng_states.append(rng_state(device))
            image_f, text_f, scale, *bias = raw(images[part], texts[part])
            image_parts.append(image_f)
            text_parts.append(text_f)
    image_all = torch.cat(image_parts).requires_grad_()
    text_all = torch.cat(text_parts).requires_grad_()
    scale_leaf = (scale if fixed_scale is None else fixed_scale).detach()
    scale_leaf.requires_grad_(fixed_scale is None)
    bias_leaves = [b.detach().requires_grad_() for b in _bias(bias, with_bias)]
    with autocast():
        loss = loss_fn(image_all, text_all, scale_leaf, *bias_leaves, *teacher_features)
    scaler.scale(loss).backward()

    last = len(slices) - 1
    for i, part in enumerate(slices):
        # DDP all-reduces on the last backward only; earlier ones accumulate locally.
        sync = model.no_sync() if i < last and raw is not model else contextlib.nullcontext()
        cuda = [device] if device.type == "cuda" else []
        with sync, torch.random.fork_rng(devices=cuda):
            set_rng_state(rng_states[i], device)
            with autocast():
                image_f, text_f, scale, *bias = model(images[part], texts[part])
            outputs, grads = [image_f, text_f], [image_all.grad[part], text_all.grad[part]]
            # The scale's and bias's gradients enter once; a zero elsewhere still marks the
            # parameter used, as DDP requires without find_unused_parameters.
            leaves = [(scale, scale_leaf)] if fixed_scale is None else []
            leaves += zip(_bias(bias, with_bias), bias_leaves, strict=True)
            for output, leaf in leaves:
                outputs.append(output)
                grads.append(leaf.grad if i == last else torch.zeros_like(leaf.grad))
            torch.autograd.backward(outputs, grads)
    return loss.detach()


def _bias(rest: list[torch.Tensor], with_bias: bool) -> list[torch.Tensor]:
    """The model's logit bias as a list of one when the loss takes it, else empty."""
    if not with_bias:
        return []
    if not rest or rest[0] is None:
        raise ValueError("the sigmoid loss needs a student with a logit bias (logit_bias None)")
    return rest[:1]
