"""The drop-in losses against open_clip's own, in float64, on both backends."""

import open_clip.loss as oc_loss
import pytest
import torch
import torch.nn.functional as F
from support import KERNEL_DEVICE, ensemble_reference, rel_err

from tinyclip_fast.losses import AffinityMimickingLoss, ClipLoss, DistillClipLoss
from tinyclip_fast.ops.affinity_loss import affinity_mimicking_loss
from tinyclip_fast.ops.backend import force_backend

BACKENDS = [("torch", "cpu"), ("triton", KERNEL_DEVICE)]


def _features(n, d, device, dtype=torch.float32):
    return F.normalize(torch.randn(n, d, dtype=torch.float64), dim=-1).to(device, dtype)


def _inputs(n, d_s, d_t, device, scale=30.0, teacher_scale=70.0):
    student = [_features(n, d_s, device).requires_grad_() for _ in range(2)]
    teacher = [_features(n, d_t, device) for _ in range(2)]
    logit_scale = torch.tensor(scale, device=device).requires_grad_()
    return student, teacher, logit_scale, torch.tensor(teacher_scale, device=device)


def _reference_grads(loss_fn, student, teacher, logit_scale, teacher_scale, weights):
    """open_clip in float64: the oracle."""
    s64 = [t.detach().double().cpu().requires_grad_() for t in student]
    scale64 = logit_scale.detach().double().cpu().requires_grad_()
    t64 = [t.detach().double().cpu() for t in teacher]
    outputs = loss_fn(*s64, scale64, *t64, teacher_scale.double().cpu())
    total = sum(w * o for w, o in zip(weights, outputs, strict=True))
    total.backward()
    return [o.detach() for o in outputs], [s64[0].grad, s64[1].grad, scale64.grad]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_distill_clip_loss_matches_open_clip(backend, device):
    student, teacher, logit_scale, teacher_scale = _inputs(29, 24, 40, device)
    weights = (0.7, -1.3)  # grad_output != 1 on both outputs
    ref_out, ref_grads = _reference_grads(
        oc_loss.DistillClipLoss(), student, teacher, logit_scale, teacher_scale, weights
    )
    with force_backend(backend):
        out = DistillClipLoss()(*student, logit_scale, *teacher, teacher_scale)
    assert isinstance(out, tuple) and len(out) == 2
    for ours, ref in zip(out, ref_out, strict=True):
        assert rel_err(ours, ref) < 1e-5
    (weights[0] * out[0] + weights[1] * out[1]).backward()
    for ours, ref in zip(
        [student[0].grad, student[1].grad, logit_scale.grad], ref_grads, strict=True
    ):
        assert rel_err(ours, ref) < 1e-4


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_clip_loss_matches_open_clip(backend, device):
    student, _, logit_scale, _ = _inputs(23, 32, 32, device, scale=100.0)
    ref_model = oc_loss.ClipLoss()
    s64 = [t.detach().double().cpu().requires_grad_() for t in student]
    ref = ref_model(*s64, logit_scale.detach().double().cpu())
    (2.5 * ref).backward()
    with force_backend(backend):
        ours = ClipLoss()(*student, logit_scale, logit_bias=torch.tensor(-10.0, device=device))
    assert rel_err(ours, ref) < 1e-5
    (2.5 * ours).backward()
    assert rel_err(student[0].grad, s64[0].grad) < 1e-4
    assert rel_err(student[1].grad, s64[1].grad) < 1e-4


def test_output_dict_and_bf16_features():
    student, teacher, logit_scale, teacher_scale = _inputs(17, 16, 16, "cpu")
    bf16 = [t.detach().bfloat16().requires_grad_() for t in student]
    with force_backend("torch"):
        out = DistillClipLoss()(*bf16, logit_scale, *teacher, teacher_scale, output_dict=True)
        clip = ClipLoss()(*bf16, logit_scale, output_dict=True)
    assert set(out) == {"contrastive_loss", "distill_loss"}
    assert set(clip) == {"contrastive_loss"}
    ref = oc_loss.DistillClipLoss()(
        *[t.detach().double() for t in bf16],
        logit_scale.detach().double(),
        *[t.double() for t in teacher],
        teacher_scale.double(),
        output_dict=True,
    )
    for key in out:
        assert rel_err(out[key], ref[key]) < 1e-2
    out["distill_loss"].backward()
    assert bf16[0].grad.dtype == torch.bfloat16 and torch.isfinite(bf16[0].grad).all()


@pytest.mark.parametrize("kind", ["soft_ce", "kl"])
def test_affinity_mimicking_loss_module_mixes_terms(kind):
    student, teacher, logit_scale, teacher_scale = _inputs(19, 16, 24, "cpu")
    weight = 0.25
    with force_backend("torch"):
        loss = AffinityMimickingLoss(contrastive_weight=weight, kind=kind)(
            *student, logit_scale, *teacher, teacher_scale
        )
    s64 = [t.detach().double() for t in student]
    t64 = [t.double() for t in teacher]
    contrastive, distill = oc_loss.DistillClipLoss()(
        *s64, logit_scale.detach().double(), *t64, teacher_scale.double()
    )
    if kind == "kl":
        teacher_logits = teacher_scale.double() * t64[0] @ t64[1].T
        entropy = 0.0
        for logits in (teacher_logits, teacher_logits.T):
            probs = logits.softmax(dim=1)
            entropy = entropy - (probs * logits.log_softmax(dim=1)).sum(1).mean() / 2
        distill = distill - entropy
    expected = (1 - weight) * distill + weight * contrastive
    assert rel_err(loss, expected) < 1e-5


def test_bad_arguments():
    with pytest.raises(ValueError, match="contrastive_weight"):
        AffinityMimickingLoss(contrastive_weight=1.5)
    with pytest.raises(ValueError, match="kind"):
        AffinityMimickingLoss(kind="mse")
    with pytest.raises(NotImplementedError, match="horovod"):
        ClipLoss(use_horovod=True)
    student, _, logit_scale, _ = _inputs(5, 8, 8, "cpu")
    with pytest.raises(ValueError, match="logit_bias"):
        ClipLoss()(*student, logit_scale, logit_bias=torch.zeros(5, 5))
    with pytest.raises(RuntimeError, match="not initialised"):
        ClipLoss(world_size=2)(*student, logit_scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_values_and_gradients_under_autocast(dtype):
    # Under CPU autocast the loss still computes and returns fp32: run (and rounded) in bf16,
    # the contrastive term would read 19.000 where open_clip's fp32 gives 18.9588.
    student, teacher, logit_scale, teacher_scale = _inputs(37, 24, 40, "cpu", scale=100.0)
    weights = (0.7, -1.3)
    ref_out, ref_grads = _reference_grads(
        oc_loss.DistillClipLoss(), student, teacher, logit_scale, teacher_scale, weights
    )
    with force_backend("torch"), torch.autocast("cpu", dtype=dtype):
        out = DistillClipLoss()(*student, logit_scale, *teacher, teacher_scale)
        (weights[0] * out[0] + weights[1] * out[1]).backward()  # backward inside autocast too
    for ours, ref in zip(out, ref_out, strict=True):
        assert ours.dtype == torch.float32 and rel_err(ours, ref) < 1e-6
    for ours, ref in zip(
        [student[0].grad, student[1].grad, logit_scale.grad], ref_grads, strict=True
    ):
        assert rel_err(ours, ref) < 1e-5


def test_contrastive_weight_means_the_same_everywhere():
    # The function and the module both mean (1 - w) L_dist + w L_clip by contrastive_weight w.
    student, teacher, logit_scale, teacher_scale = _inputs(13, 16, 16, "cpu")
    with force_backend("torch"):
        contrastive, distill = DistillClipLoss()(*student, logit_scale, *teacher, teacher_scale)
        for w in (0.0, 0.3, 1.0):
            expected = (1 - w) * distill + w * contrastive
            module = AffinityMimickingLoss(contrastive_weight=w)
            loss = module(*student, logit_scale, *teacher, teacher_scale)
            function = affinity_mimicking_loss(
                *student, logit_scale, *teacher, teacher_scale, contrastive_weight=w
            )
            assert rel_err(loss, expected) < 1e-6 and rel_err(function, expected) < 1e-6


def test_scales_and_weights_outside_their_domain_are_errors():
    # A zero, negative or non-finite logit scale and a weight outside [0, 1] are refused.
    student, teacher, logit_scale, teacher_scale = _inputs(5, 8, 8, "cpu")
    for bad in (0.0, -1.0, float("nan"), float("inf"), torch.tensor(-2.0), torch.tensor([0.0])):
        with pytest.raises(ValueError, match="logit_scale must be a finite multiplicative scale"):
            affinity_mimicking_loss(*student, bad, *teacher, teacher_scale)
        with pytest.raises(ValueError, match="teacher_logit_scale must be a finite"):
            affinity_mimicking_loss(*student, logit_scale, *teacher, bad)
        with pytest.raises(ValueError, match="logit_scale must be a finite"):
            ClipLoss()(*student, bad)
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"contrastive_weight must lie in \[0, 1\]"):
            affinity_mimicking_loss(*student, logit_scale, *teacher, teacher_scale,
                                    contrastive_weight=bad)  # fmt: skip
        with pytest.raises(ValueError, match=r"contrastive_weight must lie in \[0, 1\]"):
            AffinityMimickingLoss(contrastive_weight=bad)
    with pytest.raises(TypeError, match="contrastive_weight must be a float"):
        AffinityMimickingLoss(contrastive_weight=True)


def _ensemble(n, d_ts, device, scales=(70.0, 20.0, 45.0, 5.0)):
    """Teacher lists of len(d_ts) teachers, each with its own dim and a tensor scale."""
    images = [_features(n, d, device) for d in d_ts]
    texts = [_features(n, d, device) for d in d_ts]
    return images, texts, [torch.tensor(s, device=device) for s in scales[: len(d_ts)]]


def _ensemble_reference(student, logit_scale, ensemble, kind="soft_ce"):
    """(distill, contrastive, grads of the student and its scale) in float64."""
    s64 = [t.detach().double().cpu().requires_grad_() for t in student]
    scale64 = logit_scale.detach().double().cpu().requires_grad_()
    teachers = [
        (image.double().cpu(), text.double().cpu(), float(scale))
        for image, text, scale in zip(*ensemble, strict=True)
    ]
    return ensemble_reference(*s64, scale64, teachers, kind), s64 + [scale64]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("d_ts", [(40, 16), (40, 16, 24, 8)], ids=["K2", "K4"])
def test_distill_clip_loss_ensemble(backend, device, d_ts):
    student, _, logit_scale, _ = _inputs(29, 24, 24, device)
    ensemble = _ensemble(29, d_ts, device)
    (distill, contrastive), leaves = _ensemble_reference(student, logit_scale, ensemble)
    (0.7 * contrastive - 1.3 * distill).backward()
    with force_backend(backend):
        out = DistillClipLoss()(*student, logit_scale, *ensemble, output_dict=True)
    assert rel_err(out["distill_loss"], distill) < 1e-5
    assert rel_err(out["contrastive_loss"], contrastive) < 1e-5
    (0.7 * out["contrastive_loss"] - 1.3 * out["distill_loss"]).backward()
    for ours, ref in zip([*student, logit_scale], leaves, strict=True):
        assert rel_err(ours.grad, ref.grad) < 1e-4


@pytest.mark.parametrize("kind", ["soft_ce", "kl"])
def test_affinity_mimicking_ensemble_module_and_function(kind):
    student, _, logit_scale, _ = _inputs(19, 16, 16, "cpu")
    ensemble = _ensemble(19, (24, 8), "cpu")
    (distill, contrastive), _ = _ensemble_reference(student, logit_scale, ensemble, kind)
    expected = 0.75 * distill + 0.25 * contrastive
    with force_backend("torch"):
        module = AffinityMimickingLoss(contrastive_weight=0.25, kind=kind)
        loss = module(*student, logit_scale, *ensemble)
        function = affinity_mimicking_loss(
            *student, logit_scale, *ensemble, contrastive_weight=0.25, kind=kind
        )
    assert rel_err(loss, expected) < 1e-5 and rel_err(function, expected) < 1e-5


def test_bad_ensembles_in_the_modules():
    student, _, logit_scale, _ = _inputs(7, 8, 8, "cpu")
    images, texts, scales = _ensemble(7, (8, 4), "cpu")
    with pytest.raises(ValueError, match="same number of teachers"):
        DistillClipLoss()(*student, logit_scale, images, texts[:1], scales)
    # A teacher whose image and text dims differ (its text features are teacher 0's).
    dims = r"teacher_image_features\[1\] \(7, 4\) and teacher_text_features\[1\] \(7, 8\)"
    with pytest.raises(ValueError, match=dims):
        AffinityMimickingLoss()(*student, logit_scale, images, [texts[0], texts[0]], scales)
