"""Two CPU processes (gloo): the sigmoid losses equal open_clip's SigLipLoss rank by rank for
every dist_impl, and one process on the whole batch (ensemble distillation included)."""

import os

import open_clip.loss as oc_loss
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from support import rel_err
from tinyclip_fast.kernels import INTERPRETING

from tinyclip_fast.losses import SIGLIP_DIST_IMPLS, DistillSigLipLoss, SigLipLoss
from tinyclip_fast.ops.backend import force_backend

WORLD = 2
LOCAL_BATCH = 6
TEACHER_DIMS = (20, 12)
TEACHER_SCALES = [30.0, 60.0]
TEACHER_BIASES = [-4.0, -8.0]
# CPU processes: the kernels take CPU tensors only under the interpreter (no GPU here).
BACKENDS = ("torch", "triton") if INTERPRETING else ("torch",)


def _global_inputs():
    generator = torch.Generator().manual_seed(4321)

    def features(d):
        return F.normalize(torch.randn(WORLD * LOCAL_BATCH, d, generator=generator), dim=-1)

    student = [features(12), features(12)]
    teachers = [(features(d), features(d)) for d in TEACHER_DIMS]
    return student, teachers


def _run(loss_fn, image, text, *teacher_args):
    student = [image.clone().requires_grad_(), text.clone().requires_grad_()]
    scale = torch.tensor(20.0, requires_grad=True)
    bias = torch.tensor(-5.0, requires_grad=True)
    out = loss_fn(*student, scale, bias, *teacher_args)
    total = sum(out) if isinstance(out, tuple) else out
    total.backward()
    return {
        "loss": total.detach(),
        "grads": [student[0].grad, student[1].grad, scale.grad, bias.grad],
    }


def _rank_main(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    (image, text), teachers = _global_inputs()
    image, text = image[rows], text[rows]
    world = dict(rank=rank, world_size=WORLD)
    results = {}
    for dist_impl in SIGLIP_DIST_IMPLS:
        loss_fn = oc_loss.SigLipLoss(dist_impl=dist_impl, **world)
        results["open_clip", dist_impl] = _run(loss_fn, image, text)
    for backend in BACKENDS:
        with force_backend(backend):
            for dist_impl in SIGLIP_DIST_IMPLS:
                loss_fn = SigLipLoss(dist_impl=dist_impl, **world)
                results[backend, dist_impl] = _run(loss_fn, image, text)
            results[backend, "distill"] = _run(
                DistillSigLipLoss(**world, distill_loss_weights=(0.5, 1.0)), image, text,
                [t[0][rows] for t in teachers], [t[1][rows] for t in teachers],
                TEACHER_SCALES, TEACHER_BIASES,
            )  # fmt: skip
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _one_process_reference():
    """The whole batch in one float64 process: the oracle of the per-rank means."""
    (image, text), teachers = _global_inputs()
    student = [t.double().requires_grad_() for t in (image, text)]
    scale = torch.tensor(20.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-5.0, dtype=torch.float64, requires_grad=True)
    logits = scale * student[0] @ student[1].T + bias
    n = logits.shape[0]
    contrastive = -F.logsigmoid((2 * torch.eye(n, dtype=torch.float64) - 1) * logits).sum() / n
    p = sum(
        torch.sigmoid(s * ti.double() @ tt.double().T + b)
        for (ti, tt), s, b in zip(teachers, TEACHER_SCALES, TEACHER_BIASES, strict=True)
    ) / len(teachers)
    distill = F.binary_cross_entropy_with_logits(logits, p, reduction="sum") / n
    return {
        name: (loss, torch.autograd.grad(loss, [*student, scale, bias], retain_graph=True))
        for name, loss in (("siglip", contrastive), ("distill", 0.5 * contrastive + distill))
    }


@pytest.mark.slow  # two spawned processes
def test_two_processes(tmp_path):
    # One spawn serves both backends: starting the processes is most of this test's time.
    mp.spawn(_rank_main, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    reference = _one_process_reference()
    for backend in BACKENDS:
        for r in ranks:
            for dist_impl in SIGLIP_DIST_IMPLS:
                ours, theirs = r[backend, dist_impl], r["open_clip", dist_impl]
                assert rel_err(ours["loss"], theirs["loss"]) < 1e-5, (backend, dist_impl)
                for mine, expected in zip(ours["grads"], theirs["grads"], strict=True):
                    assert rel_err(mine, expected) < 1e-4, (backend, dist_impl)

        # Each rank's loss is a mean over its rows: their mean is the global loss. The
        # gather's backward sums every rank's loss, so a rank's feature gradient is WORLD
        # times its slice of the one-process gradient; DDP's mean of the scale and bias
        # gradients is the global one.
        for name, key in (("siglip", (backend, "bidir")), ("distill", (backend, "distill"))):
            loss, grads = reference[name]
            assert rel_err(sum(r[key]["loss"] for r in ranks) / WORLD, loss) < 1e-5, key
            for rank, r in enumerate(ranks):
                rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
                for mine, expected in zip(r[key]["grads"][:2], grads[:2], strict=True):
                    assert rel_err(mine / WORLD, expected[rows]) < 1e-4, key
            for index in (2, 3):
                mean = sum(r[key]["grads"][index] for r in ranks) / WORLD
                assert rel_err(mean, grads[index]) < 1e-4, key
