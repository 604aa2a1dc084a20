"""The loss ops read no device value on the host in forward + backward, on the kernel path.

Every call of the package's own code (tinyclip_fast/, kernels/) that brings a tensor's
values to the host (item, tolist, float / int / bool of a tensor, cpu, numpy, nonzero,
torch.equal) is counted while the ops run under the Triton interpreter: on CUDA each one
would stall the launch queue for a host round trip. Scales are given as tensors, as a
training step passes them; the Triton interpreter's own reads (it runs the kernels in numpy)
are not the package's and are not counted. Both backends run: the PyTorch path of the CPU
takes the same code path as the kernels' (no read there either).
"""

import sys
from pathlib import Path

import pytest
import tinyclip_fast.kernels
import torch
from support import KERNEL_DEVICE

import tinyclip_fast
from tinyclip_fast.losses import ClipLoss, DistillClipLoss, DistillSigLipLoss, SigLipLoss
from tinyclip_fast.ops.affinity_loss import affinity_loss_rows, affinity_loss_square
from tinyclip_fast.ops.backend import force_backend
from tinyclip_fast.ops.sigmoid_loss import sigmoid_loss_rows

PACKAGE = tuple(
    str(Path(module.__file__).parent) for module in (tinyclip_fast, tinyclip_fast.kernels)
)
READS = [
    (torch.Tensor, name)
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu")
] + [(torch.Tensor, "numpy"), (torch.Tensor, "nonzero"), (torch, "nonzero"), (torch, "equal")]


@pytest.fixture
def host_reads(monkeypatch):
    """The list of (read, file:line) of the package's host reads while the fixture lives."""
    reads = []

    def counting(owner, name):
        original = getattr(owner, name)

        def read(*args, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(PACKAGE):
                reads.append((name, f"{caller.co_filename}:{sys._getframe(1).f_lineno}"))
            return original(*args, **kwargs)

        return read

    for owner, name in READS:
        monkeypatch.setattr(owner, name, counting(owner, name))
    return reads


def _features(n, d, grad=False):
    x = torch.nn.functional.normalize(torch.randn(n, d, device=KERNEL_DEVICE), dim=1)
    return x.requires_grad_(grad)


def _scale(value):
    return torch.tensor(value, device=KERNEL_DEVICE, requires_grad=True)


def _affinity_square():
    x, y = _features(37, 16, True), _features(37, 16, True)
    scale = _scale(20.0)
    teachers = [_features(37, 24) for _ in range(2)], [_features(37, 24) for _ in range(2)]
    distill, contrastive = affinity_loss_square(
        x, y, scale, *teachers, [_scale(10.0), _scale(5.0)], kind="kl", compute_contrastive=True
    )
    (distill + 0.5 * contrastive).backward()


def _affinity_rows():
    x, y = _features(21, 16, True), _features(53, 16, True)
    distill, contrastive = affinity_loss_rows(
        x, y, _scale(20.0), _features(21, 8), _features(53, 8), _scale(10.0),
        compute_contrastive=True, label_offset=17,
    )  # fmt: skip
    (distill * 2 + contrastive).backward()


def _sigmoid_rows(weights=(1.0, 1.0)):
    x, y = _features(37, 16, True), _features(37, 16, True)
    contrastive, distill = sigmoid_loss_rows(
        x, y, _scale(10.0), _scale(-3.0), _features(37, 8), _features(37, 8), _scale(5.0),
        _scale(1.0),
    )  # fmt: skip
    if weights == (1.0, 1.0):
        (contrastive + distill).backward()
    else:  # another mix than the forward's: one pass per term in the backward
        (weights[0] * contrastive + weights[1] * distill).backward()


def _clip_loss():
    x, y = _features(37, 16, True), _features(37, 16, True)
    ClipLoss()(x, y, _scale(20.0)).backward()


def _distill_clip_loss():
    x, y = _features(37, 16, True), _features(37, 16, True)
    contrastive, distill = DistillClipLoss()(
        x, y, _scale(20.0), _features(37, 24), _features(37, 24), _scale(10.0)
    )
    (contrastive + distill).backward()


def _siglip_loss():
    x, y = _features(37, 16, True), _features(37, 16, True)
    SigLipLoss()(x, y, _scale(10.0), _scale(-3.0)).backward()


def _distill_siglip_loss():
    x, y = _features(37, 16, True), _features(37, 16, True)
    teachers = [_features(37, 8), _features(37, 24)], [_features(37, 8), _features(37, 24)]
    contrastive, distill = DistillSigLipLoss(distill_loss_weights=(0.5, 1.0), kind="kl")(
        x, y, _scale(10.0), _scale(-3.0), *teachers, [_scale(5.0), _scale(8.0)],
        [_scale(1.0), _scale(-2.0)],
    )  # fmt: skip
    (contrastive + distill).backward()


RUNS = {
    "affinity_square_kl_ensemble": _affinity_square,
    "affinity_rows": _affinity_rows,
    "sigmoid_rows": _sigmoid_rows,
    "sigmoid_rows_other_mix": lambda: _sigmoid_rows((0.7, -1.3)),
    "ClipLoss": _clip_loss,
    "DistillClipLoss": _distill_clip_loss,
    "SigLipLoss": _siglip_loss,
    "DistillSigLipLoss": _distill_siglip_loss,
}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("run", list(RUNS.values()), ids=list(RUNS))
def test_forward_and_backward_read_nothing_on_the_host(host_reads, run, backend):
    torch.manual_seed(0)
    with force_backend(backend):
        run()
    assert host_reads == []


def test_the_counter_sees_the_package_reads(host_reads):
    # Code whose frames the package's files own, as the counter attributes them.
    code = compile(
        "x.item(); x.tolist(); float(x); torch.equal(x, x)", PACKAGE[0] + "/x.py", "exec"
    )
    exec(code, {"x": _scale(1.0).detach(), "torch": torch})
    assert [name for name, _ in host_reads] == ["item", "tolist", "__float__", "equal"]
