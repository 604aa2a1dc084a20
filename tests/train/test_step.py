"""The training step: GradCache accumulation equals the whole batch at once."""

import copy

import open_clip
import pytest
import torch
from support import STUDENT_CFG, TEXT, make_teacher, rel_err

from tinyclip_fast.data.datasets import SyntheticPairDataset
from tinyclip_fast.losses import AffinityMimickingLoss
from tinyclip_fast.ops.backend import force_backend
from tinyclip_fast.pruning.masked_clip import MaskedCLIP
from tinyclip_fast.train.step import train_step


def _loss_fn(*args):
    return AffinityMimickingLoss()(*args)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(model, images, texts, teacher_feats, micro, fixed_scale=None):
    model.zero_grad(set_to_none=True)
    with force_backend("torch"):
        loss = train_step(
            model,
            images,
            texts,
            teacher_feats,
            _loss_fn,
            micro_batch_size=micro,
            autocast=lambda: torch.autocast("cpu", enabled=False),
            scaler=torch.amp.GradScaler("cpu", enabled=False),
            fixed_scale=fixed_scale,
        )
    return loss, _grads(model)


@pytest.mark.parametrize(
    "variant", ["learnable_scale", "fixed_scale", "masked_eval", "masked_train"]
)
def test_grad_accumulation_equals_big_batch(variant):
    teacher = make_teacher()
    student = open_clip.model.CLIP(**STUDENT_CFG)
    if variant.startswith("masked"):
        # eval: deterministic masks, the same for any batch split. train: sampled masks, one
        # sample per step (fix_mask_sample), shared by every micro-batch and both passes.
        # log_alpha spread around 1 so the masks are soft and log_alpha gets gradients.
        student = MaskedCLIP(copy.deepcopy(make_teacher(seed=2)).requires_grad_(True))
        with torch.no_grad():
            for log_alpha in student.mask_parameters():
                log_alpha.copy_(torch.randn(log_alpha.shape) * 2 + 1)
        student.train(variant == "masked_train")
        student.fix_mask_sample(123)
    data = SyntheticPairDataset(20, image_size=32, **TEXT).__getitem__
    batch = [data(i) for i in range(20)]
    images = torch.stack([b["image"] for b in batch])
    texts = torch.stack([b["text"] for b in batch])
    with torch.no_grad():
        t_img, t_txt, t_scale = teacher(images, texts)
    fixed = torch.tensor(50.0) if variant == "fixed_scale" else None
    if fixed is not None:
        student.logit_scale.requires_grad_(False)
    loss_big, big = _step(student, images, texts, (t_img, t_txt, t_scale), 20, fixed)
    loss_acc, acc = _step(student, images, texts, (t_img, t_txt, t_scale), 6, fixed)  # 6+6+6+2
    assert rel_err(loss_acc, loss_big) < 1e-6
    assert big.keys() == acc.keys() and len(big) > 10
    if variant.startswith("masked"):
        assert any(n.endswith("log_alpha") for n in big)
    for name in big:
        assert rel_err(acc[name], big[name]) < 1e-5, (name, rel_err(acc[name], big[name]))


def test_grad_accumulation_replays_dropout():
    # With patch dropout, GradCache must backprop through the SAME tokens it dropped in the
    # no-grad pass. Oracle: the micro-batches run with grad in one graph, same RNG start.
    cfg = copy.deepcopy(STUDENT_CFG)
    cfg["vision_cfg"]["patch_dropout"] = 0.5
    student = open_clip.model.CLIP(**cfg).train()
    images, texts = torch.randn(12, 3, 32, 32), torch.randint(1, 999, (12, 16))
    t_img = torch.nn.functional.normalize(torch.randn(12, 24), dim=-1)
    t_txt = torch.nn.functional.normalize(torch.randn(12, 24), dim=-1)
    feats = (t_img, t_txt, torch.tensor(30.0))

    torch.manual_seed(5)
    parts = [student(images[s : s + 4], texts[s : s + 4]) for s in range(0, 12, 4)]
    with force_backend("torch"):
        loss = _loss_fn(
            torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), parts[0][2], *feats
        )
    student.zero_grad()
    loss.backward()
    expected = _grads(student)

    torch.manual_seed(5)
    _, got = _step(student, images, texts, feats, 4)
    for name in expected:
        assert rel_err(got[name], expected[name]) < 1e-5, name
