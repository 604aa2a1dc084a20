"""Two CPU processes (gloo) give the loss and gradients of one process on the whole batch,
and the same numbers as open_clip's losses in the same two-process set-up; a two-teacher
ensemble (which open_clip lacks) against our one-process float64 loss."""

import os

import open_clip.loss as oc_loss
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from support import rel_err

from tinyclip_fast.losses import DistillClipLoss
from tinyclip_fast.ops.backend import force_backend

WORLD = 2
LOCAL_BATCH = 6


def _global_inputs():
    generator = torch.Generator().manual_seed(1234)

    def features(d):
        return F.normalize(torch.randn(WORLD * LOCAL_BATCH, d, generator=generator), dim=-1)

    return features(12), features(12), features(20), features(20), features(8), features(8)


def _teachers(inputs, ensemble, dtype=torch.float32):
    """(image, text, scale) of the teacher, or lists of the two teachers' for an ensemble."""
    scales = [torch.tensor(50.0, dtype=dtype), torch.tensor(30.0, dtype=dtype)]
    if ensemble:
        return [inputs[2], inputs[4]], [inputs[3], inputs[5]], scales
    return inputs[2], inputs[3], scales[0]


def _rank_main(rank, init_file, out_dir, backend, local_loss, gather_with_grad, ensemble):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    inputs = [t[rows] for t in _global_inputs()]
    image, text = inputs[:2]
    results = {}
    losses = (("ours", DistillClipLoss), ("open_clip", oc_loss.DistillClipLoss))
    for name, loss_cls in losses[:1] if ensemble else losses:
        student = [image.clone().requires_grad_(), text.clone().requires_grad_()]
        scale = torch.tensor(20.0, requires_grad=True)
        loss_fn = loss_cls(
            local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=WORLD
        )
        with force_backend(backend if name == "ours" else None):
            contrastive, distill = loss_fn(*student, scale, *_teachers(inputs, ensemble))
        (contrastive + 0.5 * distill).backward()
        results[name] = {
            "contrastive": contrastive.detach(),
            "distill": distill.detach(),
            "grads": [student[0].grad, student[1].grad, scale.grad],
        }
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes
@pytest.mark.parametrize(
    "backend,local_loss,gather_with_grad,ensemble",
    [
        ("torch", True, True, False),
        ("torch", False, True, False),
        ("torch", False, False, False),
        ("triton", True, True, False),
        # The ensemble in the mode AffinityMimickingLoss runs (one spawn: ~30 s on 2 cores).
        ("torch", True, True, True),
    ],
)
def test_two_processes_equal_one_process(tmp_path, backend, local_loss, gather_with_grad, ensemble):
    mp.spawn(
        _rank_main,
        args=(
            str(tmp_path / "init"), str(tmp_path), backend, local_loss, gather_with_grad,
            ensemble,
        ),
        nprocs=WORLD,
    )  # fmt: skip
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    # One process on the concatenated batch, float64: the oracle.
    inputs = [t.double() for t in _global_inputs()]
    student = [inputs[0].clone().requires_grad_(), inputs[1].clone().requires_grad_()]
    scale = torch.tensor(20.0, dtype=torch.float64, requires_grad=True)
    oracle = oc_loss.DistillClipLoss()
    if ensemble:
        oracle = DistillClipLoss()
    with force_backend("torch"):
        contrastive, distill = oracle(
            *student, scale, *_teachers(inputs, ensemble, dtype=torch.float64)
        )
    (contrastive + 0.5 * distill).backward()

    for name in ("ours",) if ensemble else ("ours", "open_clip"):
        # Each rank's loss is a mean over its rows, so the global loss is their mean.
        mean_contrastive = sum(r[name]["contrastive"] for r in ranks) / WORLD
        mean_distill = sum(r[name]["distill"] for r in ranks) / WORLD
        if local_loss:
            assert rel_err(mean_contrastive, contrastive) < 1e-5
            assert rel_err(mean_distill, distill) < 1e-5
        else:
            for r in ranks:
                assert rel_err(r[name]["contrastive"], contrastive) < 1e-5
                assert rel_err(r[name]["distill"], distill) < 1e-5

    # Ours equals open_clip rank by rank, gradients included.
    for r in ranks if not ensemble else ():
        for ours, theirs in zip(r["ours"]["grads"], r["open_clip"]["grads"], strict=True):
            assert rel_err(ours, theirs) < 1e-4

    if local_loss and gather_with_grad:
        # DDP averages gradients over ranks: each rank's feature gradient is WORLD times its
        # share of the one-process gradient (the all-gather's backward sums every rank's loss).
        for rank, r in enumerate(ranks):
            rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
            assert rel_err(r["ours"]["grads"][0] / WORLD, student[0].grad[rows]) < 1e-4
            assert rel_err(r["ours"]["grads"][1] / WORLD, student[1].grad[rows]) < 1e-4
        mean_scale_grad = sum(r["ours"]["grads"][2] for r in ranks) / WORLD
        assert rel_err(mean_scale_grad, scale.grad) < 1e-4
