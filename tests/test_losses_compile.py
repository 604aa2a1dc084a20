"""torch.compile(fullgraph=True) of a function calling each drop-in loss: the loss ops are
registered operators (torch.library) with fake implementations, so the whole forward and
backward is one graph; the compiled values and gradients equal eager's."""

import pytest
import torch
import torch.nn.functional as F
from support import KERNEL_DEVICE, rel_err

from tinyclip_fast.losses import ClipLoss, DistillClipLoss, DistillSigLipLoss, SigLipLoss
from tinyclip_fast.ops.backend import force_backend

pytestmark = pytest.mark.slow  # each case compiles a graph


def _clip(x, y, scale, tx, ty, teacher_scale):
    return ClipLoss()(x, y, scale)


def _distill_clip(x, y, scale, tx, ty, teacher_scale):
    contrastive, distill = DistillClipLoss()(x, y, scale, tx, ty, teacher_scale)
    return contrastive + distill


def _siglip(x, y, scale, tx, ty, teacher_scale):
    return SigLipLoss()(x, y, scale, -scale)


def _distill_siglip(x, y, scale, tx, ty, teacher_scale):
    contrastive, distill = DistillSigLipLoss(distill_loss_weights=(0.5, 1.0))(
        x, y, scale, -scale, tx, ty, teacher_scale, 1.0
    )
    return 0.3 * contrastive + distill  # another mix than the forward's: one pass per term


LOSSES = {
    "ClipLoss": _clip,
    "DistillClipLoss": _distill_clip,
    "SigLipLoss": _siglip,
    "DistillSigLipLoss": _distill_siglip,
}


def _inputs():
    unit = lambda n, d: F.normalize(torch.randn(n, d, device=KERNEL_DEVICE), dim=1)
    x, y = unit(37, 16).requires_grad_(), unit(37, 16).requires_grad_()
    scale = torch.tensor(10.0, device=KERNEL_DEVICE, requires_grad=True)
    return x, y, scale, unit(37, 8), unit(37, 8), torch.tensor(5.0, device=KERNEL_DEVICE)


def _step(loss, inputs):
    value = loss(*inputs)
    value.backward()
    grads = [t.grad.clone() for t in inputs[:3]]
    for t in inputs[:3]:
        t.grad = None
    return value.detach(), grads


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss", list(LOSSES.values()), ids=list(LOSSES))
def test_fullgraph_compile_equals_eager(loss, backend):
    torch._dynamo.reset()
    inputs = _inputs()
    with force_backend(backend):
        eager, eager_grads = _step(loss, inputs)
        compiled, grads = _step(torch.compile(loss, fullgraph=True, backend="aot_eager"), inputs)
    assert rel_err(compiled, eager) < 1e-6
    for grad, expected in zip(grads, eager_grads, strict=True):
        assert rel_err(grad, expected) < 1e-6


def test_inductor_compiles_the_distillation_loss():
    # Inductor generates code around the opaque operators (C++ on the CPU).
    torch._dynamo.reset()
    inputs = _inputs()
    with force_backend("torch"):
        eager, eager_grads = _step(_distill_clip, inputs)
        compiled, grads = _step(torch.compile(_distill_clip, fullgraph=True), inputs)
    assert rel_err(compiled, eager) < 1e-6
    for grad, expected in zip(grads, eager_grads, strict=True):
        assert rel_err(grad, expected) < 1e-5
