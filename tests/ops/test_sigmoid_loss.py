"""Fused sigmoid losses against float64 references that materialise the [m, N] logits."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from support import KERNEL_DEVICE, rel_err

import tinyclip_fast.ops.chunking as chunking
import tinyclip_fast.ops.sigmoid_loss as sigmoid_module
from tinyclip_fast.ops.backend import force_backend
from tinyclip_fast.ops.sigmoid_loss import (
    siglip_loss,
    sigmoid_distill_loss,
    sigmoid_loss_rows,
)

TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def reference(x, y, a, c, teachers, kind, weights, label_offset):
    """(w_c L_c, w_d L_d) in the inputs' dtype from materialised logits."""
    A = a * x @ y.T + c
    z = -torch.ones_like(A)
    rows = torch.arange(x.shape[0])
    z[rows, rows + label_offset] = 1
    contrastive = -F.logsigmoid(z * A).sum() / x.shape[0]
    distill = torch.zeros((), dtype=A.dtype)
    if teachers:
        p = sum(torch.sigmoid(b * tx @ ty.T + cb) for tx, ty, b, cb in teachers) / len(teachers)
        if kind == "mobileclip":
            distill = -F.logsigmoid((2 * p - 1) * A).sum() / x.shape[0]
        else:
            bce = -(p * F.logsigmoid(A) + (1 - p) * F.logsigmoid(-A))
            if kind == "kl":
                bce = bce + torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p)
            distill = bce.sum() / x.shape[0]
    return weights[0] * contrastive, weights[1] * distill


def unit(k, d, dtype, device, generator=None):
    f = F.normalize(torch.randn(k, d, dtype=torch.float64, generator=generator), dim=1)
    return f.to(dtype).to(device)


def check(
    *, m=37, n=53, d_s=24, teacher_dims=(40,), dtype=torch.float32, teacher_dtype=None,
    scale=10.0, bias=-5.0, teacher_scales=None, teacher_biases=None, kind="bce",
    weights=(1.0, 1.0), label_offset=0, grads=(1.0, 1.0), backend="torch", device="cpu",
    non_contiguous=False, tol=None,
):  # fmt: skip
    teacher_dtype = teacher_dtype or dtype
    x, y = unit(m, d_s, dtype, device), unit(n, d_s, dtype, device)
    t_rows = [unit(m, d, teacher_dtype, device) for d in teacher_dims]
    t_cols = [unit(n, d, teacher_dtype, device) for d in teacher_dims]
    if non_contiguous:
        # Column-major storage and a strided slice: no student input is contiguous.
        x = x.T.contiguous().T
        y = y.repeat_interleave(2, dim=1)[:, ::2]
        assert not x.is_contiguous() and not y.is_contiguous()
    K = len(teacher_dims)
    teacher_scales = teacher_scales or [20.0 + 15.0 * k for k in range(K)]
    teacher_biases = teacher_biases or [-8.0 + 3.0 * k for k in range(K)]
    x.requires_grad_()
    y.requires_grad_()
    for t in t_rows:
        t.requires_grad_()  # careless callers: the teachers must still get no gradient
    scalar_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    scale_t = torch.tensor(scale, dtype=scalar_dtype, device=device, requires_grad=True)
    bias_t = torch.tensor(bias, dtype=scalar_dtype, device=device, requires_grad=True)
    with force_backend(backend):
        out = sigmoid_loss_rows(
            x, y, scale_t, bias_t, t_rows if K else None, t_cols if K else None,
            teacher_scales, teacher_biases, kind=kind, contrastive_weight=weights[0],
            distill_weight=weights[1], label_offset=label_offset,
        )  # fmt: skip
        (out[0] * grads[0] + out[1] * grads[1]).backward()
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert all(o.dtype == expected_dtype and o.dim() == 0 for o in out)
    assert x.grad.dtype == dtype and y.grad.dtype == dtype
    assert all(t.grad is None for t in t_rows)

    ref_in = [t.detach().double().cpu().requires_grad_() for t in (x, y, scale_t, bias_t)]
    teachers = [
        (r.detach().double().cpu(), c.double().cpu(), s, b)
        for r, c, s, b in zip(t_rows, t_cols, teacher_scales, teacher_biases, strict=True)
    ]
    ref = reference(*ref_in, teachers, kind, weights, label_offset)
    (ref[0] * grads[0] + ref[1] * grads[1]).backward()
    tol = tol or TOLERANCE[dtype]
    for ours, expected, weight in zip(out, ref, (weights[0], weights[1] if K else 0), strict=True):
        if weight == 0:
            assert ours.item() == 0
        else:
            assert rel_err(ours, expected) < tol
    for ours, expected in zip((x, y, scale_t, bias_t), ref_in, strict=True):
        assert rel_err(ours.grad, expected.grad) < tol


@pytest.fixture
def small_chunks(monkeypatch):
    """Many row chunks in the PyTorch path."""
    monkeypatch.setattr(chunking, "CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(chunking, "MIN_CHUNK_ROWS", 8)


# ----------------------------------------------------------------------------- PyTorch path


@pytest.mark.parametrize("kind", ["bce", "kl", "mobileclip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_kinds_and_dtypes_torch(small_chunks, kind, dtype):
    check(kind=kind, dtype=dtype, weights=(0.5, 2.0), grads=(1.0, 1.0))


@pytest.mark.parametrize("scale,bias", [(1.0, 0.0), (10.0, -10.0), (100.0, 10.0), (100.0, -10.0)])
def test_scales_and_biases_torch(small_chunks, scale, bias):
    check(scale=scale, bias=bias, teacher_scales=[100.0], teacher_biases=[-10.0], kind="kl")
    check(scale=scale, bias=bias, teacher_dims=(), weights=(1.0, 0.0), label_offset=11)


@pytest.mark.parametrize("teacher_dims", [(24,), (40, 16), (8, 40, 33), (40, 16, 24, 7)])
@pytest.mark.parametrize("kind", ["bce", "mobileclip"])
def test_ensembles_torch(small_chunks, teacher_dims, kind):
    check(teacher_dims=teacher_dims, kind=kind, weights=(0.3, 1.0), label_offset=5)


@pytest.mark.parametrize("grads", [(0.7, -1.3), (0.0, 2.0), (2.0, 2.0)])
def test_grad_outputs_in_any_ratio_torch(small_chunks, grads):
    # (0.7, -1.3) differs from the forward's (1, 1) mix: the backward recomputes.
    check(grads=grads, weights=(1.0, 0.5), kind="kl")


def test_single_terms_torch(small_chunks):
    check(teacher_dims=(), weights=(1.0, 0.0), grads=(-3.0, 0.0), label_offset=16)
    check(weights=(0.0, 1.0), grads=(0.0, 2.5), kind="mobileclip")
    check(weights=(0.0, 1.0), grads=(1.0, 0.5))


def test_non_contiguous_and_mixed_dtypes_torch(small_chunks):
    check(non_contiguous=True, label_offset=7)
    check(dtype=torch.bfloat16, teacher_dtype=torch.float16, teacher_dims=(40, 12))


def test_tiny_shapes_torch():
    check(m=1, n=1, d_s=1, teacher_dims=(1,), kind="mobileclip")
    check(m=1, n=3, d_s=3, teacher_dims=(5, 1), label_offset=2, kind="kl")


def test_one_large_chunk_torch():
    check(m=300, n=300, d_s=64, teacher_dims=(96, 32), scale=100.0, kind="kl")


def test_wrappers_match_rows():
    g = torch.Generator().manual_seed(5)
    x, y, tx, ty = (unit(16, d, torch.float32, "cpu", g) for d in (8, 8, 12, 12))
    with force_backend("torch"):
        contrastive, distill = sigmoid_loss_rows(
            x, y, 30.0, -4.0, tx, ty, 40.0, -6.0, contrastive_weight=0.25, distill_weight=0.75
        )
        mixed = sigmoid_distill_loss(x, y, 30.0, -4.0, tx, ty, 40.0, -6.0, contrastive_weight=0.25)
        alone, _ = sigmoid_loss_rows(x, y, 30.0, -4.0)
        siglip = siglip_loss(x, y, 30.0, -4.0)
        _, listed = sigmoid_loss_rows(
            x, y, 30.0, -4.0, [tx], [ty], [40.0], [-6.0], contrastive_weight=0.0
        )
        same_three = sigmoid_loss_rows(
            x, y, 30.0, -4.0, [tx] * 3, [ty] * 3, [40.0] * 3, [-6.0] * 3, contrastive_weight=0.0
        )[1]
    assert rel_err(mixed, contrastive + distill) < 1e-6
    assert rel_err(siglip, alone) < 1e-7 and rel_err(4 * contrastive, alone) < 1e-6
    assert rel_err(listed, 4 / 3 * distill) < 1e-6
    assert rel_err(same_three, listed) < 1e-6


def test_kl_of_the_teacher_itself_is_zero():
    x, y = unit(24, 16, torch.float32, "cpu"), unit(24, 16, torch.float32, "cpu")
    with force_backend("torch"):
        _, bce = sigmoid_loss_rows(x, y, 50.0, -5.0, x, y, 50.0, -5.0, contrastive_weight=0)
        _, kl = sigmoid_loss_rows(
            x, y, 50.0, -5.0, x, y, 50.0, -5.0, contrastive_weight=0, kind="kl"
        )
    assert bce.item() > 0.1
    assert abs(kl.item()) < 1e-5


def test_no_gradient_work_without_autograd(monkeypatch):
    calls = []
    tiles = sigmoid_module._tiles
    monkeypatch.setattr(
        sigmoid_module, "_tiles", lambda *args: (calls.append(args[-1]), tiles(*args))[1]
    )
    x = unit(20, 8, torch.float32, "cpu").requires_grad_()
    with force_backend("torch"):
        with torch.no_grad():
            loss_off = siglip_loss(x, x, 10.0, -2.0)
        loss_on = siglip_loss(x, x, 10.0, -2.0)
        loss_detached = siglip_loss(x.detach(), x.detach(), 10.0, -2.0)
    assert calls == [False, True, False]
    assert loss_off.grad_fn is None and loss_on.grad_fn is not None
    assert rel_err(loss_off, loss_on) < 1e-7 and rel_err(loss_detached, loss_on) < 1e-7


@pytest.mark.parametrize("backend,device", [("torch", "cpu"), ("triton", KERNEL_DEVICE)])
def test_a_second_backward_gives_the_same_gradients(backend, device):
    """retain_graph's second backward reads the forward's gradient products as the first did."""
    x, y, tx, ty = (unit(37, 8, torch.float32, device).requires_grad_() for _ in range(4))
    with force_backend(backend):
        contrastive, distill = sigmoid_loss_rows(x, y, 10.0, -3.0, tx, ty, 5.0, 1.0)
        (contrastive + distill).backward(retain_graph=True)
        first = [x.grad.clone(), y.grad.clone()]
        x.grad = y.grad = None
        (contrastive + distill).backward()
    assert rel_err(x.grad, first[0]) < 1e-6 and rel_err(y.grad, first[1]) < 1e-6
    assert tx.grad is None and ty.grad is None


def test_autocast_does_not_recast_the_products_torch():
    # The kernels take autocast's dtype as their operand dtype: tests/ops/test_backend.py.
    x, y, tx, ty = (unit(37, 8, torch.float32, "cpu").requires_grad_() for _ in range(4))
    results = []
    for enabled in (False, True):
        x.grad = None
        with force_backend("torch"), torch.autocast(x.device.type, enabled=enabled):
            contrastive, distill = sigmoid_loss_rows(x, y, 10.0, -3.0, tx, ty, 5.0, 1.0)
            (contrastive + distill).backward()
        results.append((contrastive.detach(), distill.detach(), x.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_propagates_torch(small_chunks, where):
    x, y, tx, ty = (unit(37, 8, torch.float32, "cpu") for _ in range(4))
    (x if where == "student" else ty)[5, 3] = float("nan")
    with force_backend("torch"):
        contrastive, distill = sigmoid_loss_rows(x, y, 10.0, -3.0, tx, ty, 5.0, 1.0)
    assert torch.isnan(distill)
    assert torch.isnan(contrastive) == (where == "student")


def _case_id(case) -> str:
    """A bad call's test id: the error it raises and what its message names."""
    _, error, fragment = case
    return f"{error.__name__}-{fragment}"


def _bad_calls():
    x, y, tx, ty = (unit(8, d, torch.float32, "cpu") for d in (4, 4, 6, 6))
    rows = sigmoid_loss_rows
    return [
        (lambda: rows(x, y[:, :3], 1.0), ValueError, "(8, 3)"),
        (lambda: rows(x, y.to("meta"), 1.0), ValueError, "meta"),
        (lambda: rows(x[:0], y[:0], 1.0), ValueError, "(0, 4)"),
        (lambda: rows(x.long(), y, 1.0), TypeError, "torch.int64"),
        (lambda: rows(x[None], y, 1.0), ValueError, "(1, 8, 4)"),
        (lambda: rows(x, y, torch.ones(2)), ValueError, "logit_scale"),
        (lambda: rows(x, y, -1.0), ValueError, ">= 0"),
        (lambda: rows(x, y, float("inf")), ValueError, "finite"),
        (lambda: rows(x, y, 1.0, torch.tensor(float("nan"))), ValueError, "logit_bias"),
        (lambda: rows(x, y, 1.0, "zero"), TypeError, "logit_bias"),
        (lambda: rows(x, y, 1.0, kind="mse"), ValueError, "kind"),
        (lambda: rows(x, y, 1.0, label_offset=3), ValueError, "label_offset"),
        (lambda: rows(x, y, 1.0, contrastive_weight=0.0), ValueError, "no loss term"),
        (lambda: rows(x, y, 1.0, distill_weight=float("nan")), ValueError, "distill_weight"),
        (lambda: rows(x, y, 1.0, 0.0, tx, ty), ValueError, "teacher_logit_scale"),
        (lambda: rows(x, y, 1.0, 0.0, [tx, tx], [ty], [1.0, 1.0]), ValueError, "1 entries"),
        (lambda: rows(x, y, 1.0, 0.0, [tx, tx], [ty, ty], 1.0), ValueError, "give one per"),
        (lambda: rows(x, y, 1.0, 0.0, [tx] * 2, [ty] * 2, [1.0] * 2, [0.0]), ValueError, "bias"),
        (lambda: rows(x, y, 1.0, 0.0, [tx] * 5, [ty] * 5, [1.0] * 5), ValueError, "1 to 4"),
        (lambda: rows(x, y, 1.0, 0.0, tx, ty[:, :5], 1.0), ValueError, "same feature dimension"),
        (lambda: rows(x, y, 1.0, 0.0, [tx, tx[:7]], [ty] * 2, [1.0] * 2), ValueError, r"\[1\]"),
        (lambda: rows(x, y, 1.0, 0.0, tx, ty, -2.0), ValueError, ">= 0"),
        (lambda: rows(x, y, 1.0, 0.0, tx, ty.to("meta"), 1.0), ValueError, "one device"),
        (
            lambda: sigmoid_distill_loss(x, y, 1.0, 0.0, tx, ty, 1.0, contrastive_weight=2.0),
            ValueError,
            "contrastive_weight",
        ),  # fmt: skip
    ]


@pytest.mark.parametrize("case", range(24), ids=lambda i: _case_id(_bad_calls()[i]))
def test_bad_inputs(case):
    call, error, fragment = _bad_calls()[case]
    if not fragment.startswith("\\"):
        fragment = fragment.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    with pytest.raises(error, match=fragment):
        call()


@pytest.mark.slow  # a fresh interpreter in a subprocess
def test_cpu_without_interpreter_never_touches_triton():
    script = (
        "import sys, torch, tinyclip_fast.kernels as k\n"
        "assert not k.INTERPRETING\n"
        "import tinyclip_fast.ops.sigmoid_loss as sl\n"
        "x = torch.randn(16, 8, requires_grad=True)\n"
        "c, d = sl.sigmoid_loss_rows(x, x * 2, 3.0, -1.0, x.detach(), x.detach(), 2.0)\n"
        "(c + d).backward()\n"
        "assert 'tinyclip_fast.kernels.sigmoid_loss' not in sys.modules\n"
        "assert torch.isfinite(x.grad).all()\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)


# ----------------------------------------------------------------------------- Triton kernels
# Interpreted on CPU: few, small cases. m = 37 > BLOCK_M and N = 53 > BLOCK_N of the
# interpreter blocks, feature dims 24/40 around BLOCK_D: masked edges everywhere.


@pytest.mark.parametrize(
    "case",
    [
        dict(kind="bce", weights=(0.5, 2.0)),
        dict(kind="kl", dtype=torch.bfloat16, scale=100.0, bias=10.0, grads=(0.7, -1.3)),
        dict(kind="mobileclip", dtype=torch.float16, teacher_dims=(40, 16, 24, 7)),
        dict(teacher_dims=(), weights=(1.0, 0.0), scale=100.0, bias=-10.0, label_offset=16),
        dict(teacher_dims=(8, 33), weights=(0.0, 1.0), grads=(0.0, -2.0), non_contiguous=True),
        dict(dtype=torch.float64, kind="kl", teacher_dims=(12, 40, 9), tol=2e-5),
        dict(dtype=torch.bfloat16, teacher_dtype=torch.float32, scale=1.0, bias=0.0),
        dict(m=1, n=3, d_s=3, teacher_dims=(5, 1), label_offset=2, kind="kl"),
    ],
)
def test_triton(case):
    check(backend="triton", device=KERNEL_DEVICE, **case)


def test_triton_in_row_chunks_and_column_loops(monkeypatch):
    import tinyclip_fast.kernels.common as common
    import tinyclip_fast.kernels.sigmoid_loss as kernels

    # A one-byte budget rounds up to one block of rows: m = 70 takes three chunks; one
    # column program per row block walks every column tile.
    monkeypatch.setattr(common, "GRAD_CHUNK_BYTES", 1)
    monkeypatch.setattr(common, "COLUMN_PROGRAMS", 1)
    check(m=70, n=70, d_s=16, teacher_dims=(16, 8), kind="kl", backend="triton",
          device=KERNEL_DEVICE, label_offset=0)  # fmt: skip
    monkeypatch.setattr(kernels, "_LOSS_CHUNK_ROWS", 32)
    x, y, tx, ty = (unit(70, 16, torch.float32, KERNEL_DEVICE) for _ in range(4))
    with force_backend("triton"), torch.no_grad():
        ours = sigmoid_loss_rows(x, y, 20.0, -3.0, tx, ty, 10.0, 2.0)
    ref = reference(x.double(), y.double(), 20.0, -3.0, [(tx.double(), ty.double(), 10.0, 2.0)],
                    "bce", (1.0, 1.0), 0)  # fmt: skip
    assert all(rel_err(o, r) < 2e-5 for o, r in zip(ours, ref, strict=True))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's NaN warnings in the interpreter
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_propagates_triton(where):
    x, y, tx, ty = (unit(37, 8, torch.float32, KERNEL_DEVICE) for _ in range(4))
    (y if where == "student" else tx)[33, 3] = float("nan")
    with force_backend("triton"):
        contrastive, distill = sigmoid_loss_rows(x, y, 10.0, -3.0, tx, ty, 5.0, 1.0)
    assert torch.isnan(distill)
    assert torch.isnan(contrastive) == (where == "student")
