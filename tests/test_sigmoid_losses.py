"""The sigmoid drop-ins against open_clip's SigLipLoss and float64 formulas, on both backends."""

import open_clip.loss as oc_loss
import pytest
import torch
import torch.nn.functional as F
from support import KERNEL_DEVICE, rel_err

from tinyclip_fast.losses import DistillSigLipLoss, SigLipLoss
from tinyclip_fast.ops.backend import force_backend

BACKENDS = [("torch", "cpu"), ("triton", KERNEL_DEVICE)]


def _features(n, d, device, dtype=torch.float32, seed=None):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    f = F.normalize(torch.randn(n, d, dtype=torch.float64, generator=generator), dim=-1)
    return f.to(device, dtype)


def _leaf(value, device, dtype=torch.float32):
    return torch.tensor(value, dtype=dtype, device=device, requires_grad=True)


def _as64(tensors):
    return [t.detach().double().cpu().requires_grad_() for t in tensors]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (100.0, 10.0), (1.0, 0.0)])
def test_siglip_loss_matches_open_clip(backend, device, scale, bias):
    inputs = [_features(29, 24, device).requires_grad_() for _ in range(2)]
    inputs += [_leaf(scale, device), _leaf(bias, device)]
    ref_inputs = _as64(inputs)
    expected = oc_loss.SigLipLoss()(*ref_inputs)
    (0.7 * expected).backward()
    with force_backend(backend):
        out = SigLipLoss()(*inputs, output_dict=True)
    assert set(out) == {"contrastive_loss"} and out["contrastive_loss"].dim() == 0
    assert rel_err(out["contrastive_loss"], expected) < 1e-5
    (0.7 * out["contrastive_loss"]).backward()
    for ours, ref in zip(inputs, ref_inputs, strict=True):
        assert rel_err(ours.grad, ref.grad) < 1e-4


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_siglip_loss_half_features(backend, device, dtype):
    image, text = (_features(33, 40, device, dtype).requires_grad_() for _ in range(2))
    scale, bias = _leaf(20.0, device), _leaf(-8.0, device)
    ref_inputs = _as64([image, text, scale, bias])
    oc_loss.SigLipLoss()(*ref_inputs).backward()
    with force_backend(backend):
        loss = SigLipLoss()(image, text, scale, bias)
    loss.backward()
    assert loss.dtype == torch.float32 and image.grad.dtype == dtype
    assert rel_err(loss, oc_loss.SigLipLoss()(*[t.detach() for t in ref_inputs])) < 1e-2
    for ours, ref in zip((image, text, scale, bias), ref_inputs, strict=True):
        assert rel_err(ours.grad, ref.grad) < 1e-2


def _distill_reference(student, teachers, kind, weights):
    """(w_c L_c, w_d L_d) of DistillSigLipLoss in float64, the ensemble averaged after sigmoid."""
    image, text, scale, bias = student
    logits = scale * image @ text.T + bias
    labels = 2 * torch.eye(len(image), dtype=logits.dtype) - 1
    contrastive = -F.logsigmoid(labels * logits).sum() / len(image)
    p = sum(torch.sigmoid(b * ti @ tt.T + c) for ti, tt, b, c in teachers) / len(teachers)
    if kind == "mobileclip":
        distill = -F.logsigmoid((2 * p - 1) * logits).sum() / len(image)
    else:
        distill = F.binary_cross_entropy_with_logits(logits, p, reduction="sum") / len(image)
        if kind == "kl":
            entropy = -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p))
            distill = distill - entropy.sum() / len(image)
    return weights[0] * contrastive, weights[1] * distill


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind", ["bce", "kl", "mobileclip"])
def test_distill_siglip_loss_ensemble(backend, device, kind):
    n = 27
    student = [_features(n, 16, device).requires_grad_() for _ in range(2)]
    student += [_leaf(30.0, device), _leaf(-6.0, device)]
    dims, scales, biases = (24, 40), [40.0, 100.0], [-5.0, -10.0]
    teacher_image = [_features(n, d, device) for d in dims]
    teacher_text = [_features(n, d, device) for d in dims]
    weights = (0.5, 2.0)
    loss_fn = DistillSigLipLoss(distill_loss_weights=weights, kind=kind, dist_logit_bias=biases)
    with force_backend(backend):
        out = loss_fn(*student, teacher_image, teacher_text, scales)
    assert isinstance(out, tuple) and len(out) == 2
    (out[0] + out[1]).backward()

    ref_student = _as64(student)
    teachers = [
        (ti.double().cpu(), tt.double().cpu(), s, b)
        for ti, tt, s, b in zip(teacher_image, teacher_text, scales, biases, strict=True)
    ]
    ref = _distill_reference(ref_student, teachers, kind, weights)
    (ref[0] + ref[1]).backward()
    for ours, expected in zip(out, ref, strict=True):
        assert rel_err(ours, expected) < 1e-5
    for ours, expected in zip(student, ref_student, strict=True):
        assert rel_err(ours.grad, expected.grad) < 1e-4


def test_mobileclip_form_equals_its_concatenated_ensemble():
    """MobileCLIP feeds an ensemble as one concatenated feature tensor split by member dims;
    the same members as a list give the same numbers."""
    n, dims, scales, biases = 19, [12, 20], [50.0, 80.0], [-4.0, -9.0]
    image, text = _features(n, 8, "cpu", seed=1), _features(n, 8, "cpu", seed=2)
    members = [(_features(n, d, "cpu", seed=3 + k), _features(n, d, "cpu", seed=5 + k))
               for k, d in enumerate(dims)]  # fmt: skip
    concat_image = torch.cat([m[0] for m in members], dim=1)
    concat_text = torch.cat([m[1] for m in members], dim=1)
    logits = 25.0 * image @ text.T - 3.0
    bounds = [0, dims[0], sum(dims)]
    mean_sigmoid = sum(
        torch.sigmoid(scales[k] * concat_image[:, bounds[k] : bounds[k + 1]]
                      @ concat_text[:, bounds[k] : bounds[k + 1]].T + biases[k])
        for k in range(len(dims))
    ) / len(dims)  # fmt: skip
    expected = -F.logsigmoid((2 * mean_sigmoid - 1) * logits).sum(1).mean(0)
    loss_fn = DistillSigLipLoss(kind="mobileclip", distill_loss_weights=(0.0, 1.0))
    with force_backend("torch"):
        _, distill = loss_fn(image, text, 25.0, -3.0, [m[0] for m in members],
                             [m[1] for m in members], scales, biases)  # fmt: skip
    assert rel_err(distill, expected) < 1e-6


def test_teacher_scales_from_the_constructor_and_forward():
    n = 12
    student = [_features(n, 8, "cpu") for _ in range(2)]
    teacher = [_features(n, 8, "cpu") for _ in range(2)]
    with force_backend("torch"):
        default = DistillSigLipLoss(dist_logit_scale=30.0, dist_logit_bias=-2.0)
        given = DistillSigLipLoss()(*student, 10.0, 0.0, *teacher, 30.0, -2.0, output_dict=True)
        overridden = default(*student, 10.0, 0.0, *teacher, 30.0, -2.0)
        from_default = default(*student, 10.0, 0.0, *teacher)
    assert set(given) == {"contrastive_loss", "distill_loss"}
    assert rel_err(from_default[1], given["distill_loss"]) < 1e-7
    assert rel_err(overridden[1], given["distill_loss"]) < 1e-7
    with pytest.raises(ValueError, match="teacher_col_features has 1 entries"):
        DistillSigLipLoss()(*student, 10.0, 0.0, [teacher[0]] * 2, teacher[1], [1.0, 1.0])
    with pytest.raises(ValueError, match="teacher_logit_scale"):
        DistillSigLipLoss()(*student, 10.0, 0.0, *teacher)


def test_constructor_and_world_errors():
    for dist_impl in (None, "bidir", "shift", "reduce", "gather"):
        assert SigLipLoss(dist_impl=dist_impl).dist_impl == (dist_impl or "bidir")
    with pytest.raises(ValueError, match="dist_impl"):
        SigLipLoss(dist_impl="ring")
    with pytest.raises(ValueError, match="kind"):
        DistillSigLipLoss(kind="mse")
    with pytest.raises(ValueError, match="distill_loss_weights"):
        DistillSigLipLoss(distill_loss_weights=(1.0,))
    x = _features(4, 8, "cpu")
    with pytest.raises(RuntimeError, match="init_process_group"):
        SigLipLoss(rank=0, world_size=2)(x, x, 1.0, 0.0)
