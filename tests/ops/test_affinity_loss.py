"""Fused affinity loss against a float64 reference that materialises the [m, N] softmaxes."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from support import KERNEL_DEVICE, ensemble_reference, rel_err

import tinyclip_fast.ops.chunking as chunking
from tinyclip_fast.ops.affinity_loss import (
    KINDS,
    affinity_loss_rows,
    affinity_loss_square,
    affinity_mimicking_loss,
)
from tinyclip_fast.ops.backend import force_backend

TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def reference_row_losses(A, B, kind, labels):
    """Per-row soft-CE/KL and InfoNCE in float64 from materialised logits."""
    log_q = A.log_softmax(dim=1)
    distill = None
    if B is not None:
        p = B.softmax(dim=1)
        distill = -(p * log_q).sum(dim=1)
        if kind == "kl":
            distill = distill + (p * B.log_softmax(dim=1)).sum(dim=1)
    infonce = -log_q[torch.arange(A.shape[0]), labels]
    return distill, infonce


def reference(x, y, scale, xt, yt, teacher_scale, kind, square, label_offset=0):
    A = scale * x @ y.T
    B = teacher_scale * xt @ yt.T if xt is not None else None
    labels = torch.arange(x.shape[0]) + label_offset
    distill, infonce = reference_row_losses(A, B, kind, labels)
    if not square:
        return (distill.mean() if B is not None else None), infonce.mean()
    col_distill, col_infonce = reference_row_losses(
        A.T, B.T if B is not None else None, kind, labels
    )
    dist = (distill.mean() + col_distill.mean()) / 2 if B is not None else None
    return dist, (infonce.mean() + col_infonce.mean()) / 2


def make_inputs(m, n, d_s, d_t, dtype, device):
    """Random unit-norm student rows/columns and teacher rows/columns, rounded to ``dtype``."""
    feats = [F.normalize(torch.randn(k, d, dtype=torch.float64), dim=1) for k, d in
             ((m, d_s), (n, d_s), (m, d_t), (n, d_t))]  # fmt: skip
    return [f.to(dtype).to(device) for f in feats]


def check(
    *, square, m, n, d_s=24, d_t=40, dtype=torch.float32, scale=10.0, teacher_scale=5.0,
    kind="soft_ce", distill=True, contrastive=True, label_offset=0, grads=(1.3, -0.7),
    backend="torch", device="cpu", non_contiguous=False, tol=None, inputs=None,
):  # fmt: skip
    x, y, xt, yt = inputs if inputs is not None else make_inputs(m, n, d_s, d_t, dtype, device)
    if non_contiguous:
        # Column-major storage and a strided slice: no input is contiguous.
        x, xt = x.T.contiguous().T, xt.T.contiguous().T
        y, yt = (t.repeat_interleave(2, dim=1)[:, ::2] for t in (y, yt))
        assert not any(t.is_contiguous() for t in (x, y, xt, yt))
    x.requires_grad_()
    y.requires_grad_()
    float64 = dtype == torch.float64
    scale_t = torch.tensor(
        scale, dtype=torch.float64 if float64 else torch.float32, device=device, requires_grad=True
    )
    # Careless callers may hand over teacher tensors that require grad: they must get none.
    xt.requires_grad_()
    teacher = (xt, yt, teacher_scale) if distill else (None, None, None)
    with force_backend(backend):
        if square:
            out = affinity_loss_square(
                x, y, scale_t, *teacher, kind=kind, compute_distill=distill,
                compute_contrastive=contrastive,
            )  # fmt: skip
        else:
            out = affinity_loss_rows(
                x, y, scale_t, *teacher, kind=kind, compute_distill=distill,
                compute_contrastive=contrastive, label_offset=label_offset,
            )  # fmt: skip
        (out[0] * grads[0] + out[1] * grads[1]).backward()
    # float64 features give float64 losses on both paths; every other dtype fp32.
    assert all(o.dtype == (torch.float64 if float64 else torch.float32) for o in out)
    assert all(o.dim() == 0 for o in out)
    assert x.grad.dtype == dtype and y.grad.dtype == dtype
    assert xt.grad is None

    ref_in = [t.detach().double().cpu().requires_grad_() for t in (x, y)]
    ref_scale = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    ref_teacher = [t.detach().double().cpu() for t in (xt, yt)] if distill else [None, None]
    ref_d, ref_c = reference(
        *ref_in, ref_scale, *ref_teacher, teacher_scale, kind, square, label_offset
    )
    total = 0
    if distill:
        total = total + ref_d * grads[0]
    else:
        assert out[0].item() == 0
    if contrastive:
        total = total + ref_c * grads[1]
    else:
        assert out[1].item() == 0
    total.backward()
    tol = tol or TOLERANCE[dtype]
    if distill:
        assert rel_err(out[0], ref_d) < tol
    if contrastive:
        assert rel_err(out[1], ref_c) < tol
    assert rel_err(x.grad, ref_in[0].grad) < tol
    assert rel_err(y.grad, ref_in[1].grad) < tol
    assert rel_err(scale_t.grad, ref_scale.grad) < tol


@pytest.fixture
def small_chunks(monkeypatch):
    """Force many row chunks so the online column softmax of the PyTorch path is exercised."""
    monkeypatch.setattr(chunking, "CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(chunking, "MIN_CHUNK_ROWS", 8)


# ----------------------------------------------------------------------------- PyTorch path


@pytest.mark.parametrize("kind", ["soft_ce", "kl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (10.0, 5.0), (100.0, 50.0)])
def test_square_torch(small_chunks, kind, dtype, scales):
    check(square=True, m=37, n=37, kind=kind, dtype=dtype, scale=scales[0], teacher_scale=scales[1])


@pytest.mark.parametrize("distill,contrastive", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("label_offset", [0, 11])
def test_rows_torch(small_chunks, distill, contrastive, label_offset):
    check(
        square=False, m=37, n=53, distill=distill, contrastive=contrastive,
        label_offset=label_offset, kind="kl",
    )  # fmt: skip


def test_square_terms_switch_off_torch(small_chunks):
    check(square=True, m=29, n=29, distill=False, contrastive=True, grads=(0.0, 2.5))
    check(square=True, m=29, n=29, distill=True, contrastive=False, grads=(-3.0, 1.0))


def test_non_contiguous_torch(small_chunks):
    check(square=True, m=37, n=37, non_contiguous=True)
    check(square=False, m=37, n=53, label_offset=5, non_contiguous=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixed_student_and_teacher_dtypes(backend):
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    x, y, xt, yt = make_inputs(37, 37, 24, 40, torch.float32, device)
    inputs = [x.bfloat16(), y.bfloat16(), xt, yt.half()]
    check(square=True, m=37, n=37, dtype=torch.bfloat16, inputs=inputs, backend=backend,
          device=device)  # fmt: skip


@pytest.mark.parametrize("square", [True, False])
def test_float64_computes_in_float64_torch(small_chunks, square):
    """float64 in: float64 math end to end (1e-10 against the float64 reference)."""
    m, n = (37, 37) if square else (37, 53)
    check(square=square, m=m, n=n, dtype=torch.float64, scale=100.0, teacher_scale=50.0,
          label_offset=0 if square else 9, kind="kl")  # fmt: skip


def test_single_chunk_larger_batch_torch():
    check(square=True, m=300, n=300, d_s=64, d_t=96, scale=100.0, teacher_scale=100.0)


def test_matches_open_clip_distill_clip_loss():
    from open_clip.loss import DistillClipLoss

    x, y, xt, yt = make_inputs(64, 64, 32, 48, torch.float32, "cpu")
    scale, teacher_scale = torch.tensor(30.0), torch.tensor(45.0)
    expected_clip, expected_dist = DistillClipLoss()(x, y, scale, xt, yt, teacher_scale)
    with force_backend("torch"):
        dist, clip = affinity_loss_square(
            x, y, scale, xt, yt, teacher_scale, compute_contrastive=True
        )
        mixed = affinity_mimicking_loss(x, y, scale, xt, yt, teacher_scale, contrastive_weight=0.25)
        pure = affinity_mimicking_loss(x, y, scale, xt, yt, teacher_scale)
    assert rel_err(dist, expected_dist) < 1e-5
    assert rel_err(clip, expected_clip) < 1e-5
    assert rel_err(mixed, 0.75 * expected_dist + 0.25 * expected_clip) < 1e-5
    assert rel_err(pure, expected_dist) < 1e-5


def test_float_scales_and_kl_is_soft_ce_minus_entropy():
    x, y, xt, yt = make_inputs(16, 16, 8, 8, torch.float32, "cpu")
    with force_backend("torch"):
        soft_ce, _ = affinity_loss_square(x, y, 20.0, xt, yt, 20.0)
        kl, _ = affinity_loss_square(x, y, 20.0, xt, yt, 20.0, kind="kl")
        self_kl, _ = affinity_loss_square(x, y, 20.0, x, y, 20.0, kind="kl")
    assert kl.item() < soft_ce.item()
    assert abs(self_kl.item()) < 1e-5


@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_propagates_torch(small_chunks, where):
    x, y, xt, yt = make_inputs(37, 37, 24, 40, torch.float32, "cpu")
    (x if where == "student" else yt)[5, 3] = float("nan")
    with force_backend("torch"):
        dist, clip = affinity_loss_square(x, y, 10.0, xt, yt, 5.0, compute_contrastive=True)
    assert torch.isnan(dist)
    if where == "student":
        assert torch.isnan(clip)


def _case_id(case) -> str:
    """A bad call's test id: the error it raises and what its message names."""
    _, error, fragment = case
    return f"{error.__name__}-{fragment}"


def _bad_calls():
    x, y, xt, yt = make_inputs(8, 8, 4, 6, torch.float32, "cpu")
    sq = affinity_loss_square
    return [
        (lambda: sq(x, y[:7], 1.0, xt, yt, 1.0), ValueError, "text_features"),
        (lambda: sq(x, y, 1.0, xt[:7], yt, 1.0), ValueError, "teacher_image_features"),
        (lambda: sq(x, y, 1.0, xt, yt[:7], 1.0), ValueError, "teacher_text_features"),
        (lambda: sq(x, y[:, :3], 1.0, xt, yt, 1.0), ValueError, "(8, 3)"),
        (lambda: sq(x, y, 1.0, xt, yt[:, :5], 1.0), ValueError, "(8, 5)"),
        (lambda: sq(x, y, 1.0, xt.to("meta"), yt, 1.0), ValueError, "meta"),
        (lambda: sq(x[:0], y[:0], 1.0, xt[:0], yt[:0], 1.0), ValueError, "(0, 4)"),
        (lambda: sq(x.long(), y, 1.0, xt, yt, 1.0), TypeError, "torch.int64"),
        (lambda: sq(x[None], y, 1.0, xt, yt, 1.0), ValueError, "(1, 8, 4)"),
        (lambda: sq(x, y, torch.ones(2), xt, yt, 1.0), ValueError, "logit_scale"),
        (lambda: sq(x, y, 1.0, xt, yt, torch.ones(2, 1)), ValueError, "teacher_logit_scale"),
        (lambda: sq(x, y, 1.0, xt, yt, 1.0, kind="mse"), ValueError, "kind"),
        (lambda: sq(x, y, 1.0), ValueError, "teacher_image_features"),
        (
            lambda: affinity_loss_rows(
                x, y, 1.0, compute_distill=False, compute_contrastive=True, label_offset=3
            ),
            ValueError,
            "label_offset",
        ),  # fmt: skip
    ]


@pytest.mark.parametrize("case", range(14), ids=lambda i: _case_id(_bad_calls()[i]))
def test_bad_inputs(case):
    call, error, fragment = _bad_calls()[case]
    with pytest.raises(error, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        call()


@pytest.mark.slow  # a fresh interpreter in a subprocess
def test_cpu_without_interpreter_never_touches_triton():
    script = (
        "import torch, tinyclip_fast.kernels as k\n"
        "assert not k.INTERPRETING\n"
        "import tinyclip_fast.ops.affinity_loss as al\n"
        "from tinyclip_fast.ops.backend import use_triton\n"
        "x = torch.randn(16, 8, requires_grad=True)\n"
        "assert not use_triton(x)\n"
        "d, c = al.affinity_loss_square(x, x * 2, 3.0, x.detach(), x.detach(), 2.0,\n"
        "                               compute_contrastive=True)\n"
        "(d + c).backward()\n"
        "import sys\n"
        "assert 'tinyclip_fast.kernels.affinity_loss' not in sys.modules\n"
        "assert torch.isfinite(x.grad).all()\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)


# ----------------------------------------------------------------------------- Triton kernels
# Interpreted on CPU: few, small cases. m = 37 > BLOCK_M and N = 53 > BLOCK_N of the
# interpreter config, so several row programs and column tiles (and the atomics) take part.


@pytest.mark.parametrize(
    "case",
    [
        dict(square=True, m=37, n=37, kind="kl"),
        dict(square=True, m=37, n=37, dtype=torch.bfloat16, scale=100.0, teacher_scale=50.0),
        dict(square=True, m=37, n=37, dtype=torch.float16, contrastive=False, grads=(0.5, 0)),
        dict(square=True, m=37, n=37, distill=False, scale=1.0, non_contiguous=True),
        dict(square=False, m=21, n=53, label_offset=17, dtype=torch.bfloat16),
        dict(square=False, m=37, n=53, label_offset=9, kind="kl", scale=100.0, teacher_scale=100.0),
        dict(square=False, m=37, n=53, distill=False, grads=(0.0, -2.0), non_contiguous=True),
        # float64 features: the kernels compute in fp32, the loss comes back as float64.
        dict(square=True, m=37, n=37, dtype=torch.float64, tol=TOLERANCE[torch.float32]),
    ],
)
def test_triton(case):
    check(backend="triton", device=KERNEL_DEVICE, **case)


def test_triton_backward_in_row_chunks(monkeypatch):
    import tinyclip_fast.kernels.common as common

    # A one-byte budget rounds up to one block of rows: m = 70 takes several chunks.
    monkeypatch.setattr(common, "GRAD_CHUNK_BYTES", 1)
    check(square=True, m=70, n=70, d_s=16, d_t=16, backend="triton", device=KERNEL_DEVICE)


# Column splits of the statistics kernel: 128 columns each gives one split, 32 one split per
# 32-column tile, 1 more splits (up to COLUMN_PROGRAMS) than tiles, some of them empty.
@pytest.mark.parametrize("split_columns", [32, 1])
@pytest.mark.parametrize(
    "case",
    [
        dict(square=True, m=101, n=101, kind="kl"),
        dict(square=True, m=70, n=70, dtype=torch.bfloat16, scale=100.0, teacher_scale=50.0),
        dict(square=False, m=21, n=101, label_offset=57, dtype=torch.float16),
    ],
    ids=["square-kl-fp32", "square-bf16", "rows-fp16"],
)
def test_triton_column_splits(monkeypatch, split_columns, case):
    import tinyclip_fast.kernels.common as common

    monkeypatch.setattr(common, "SPLIT_COLUMNS", split_columns)
    assert common.column_splits(case["m"], case["n"]) > 1
    check(backend="triton", device=KERNEL_DEVICE, **case)


@pytest.mark.parametrize("split_columns", [32, 1])
@pytest.mark.parametrize("square", [True, False], ids=["square", "rows"])
def test_ensemble_triton_column_splits(monkeypatch, split_columns, square):
    import tinyclip_fast.kernels.common as common

    monkeypatch.setattr(common, "SPLIT_COLUMNS", split_columns)
    m = 101 if square else 21
    check_ensemble(
        square=square, m=m, n=101, kind="kl", d_ts=(40, 16, 24), label_offset=0 if square else 60,
        teacher_scales=(5.0, 30.0, 50.0), backend="triton", device=KERNEL_DEVICE,
    )  # fmt: skip


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's NaN warnings in the interpreter
@pytest.mark.parametrize("where", ["student_row", "student_col", "teacher"])
def test_nan_propagates_triton(where):
    x, y, xt, yt = make_inputs(37, 37, 24, 40, torch.float32, KERNEL_DEVICE)
    {"student_row": x, "student_col": y, "teacher": xt}[where][33, 3] = float("nan")
    with force_backend("triton"):
        dist, clip = affinity_loss_square(x, y, 10.0, xt, yt, 5.0, compute_contrastive=True)
    assert torch.isnan(dist)
    if where != "teacher":
        assert torch.isnan(clip)


def test_column_underflow_falls_back_to_exact_pass(monkeypatch):
    """Columns far below their fixed shift are recomputed exactly, the others are not."""
    import tinyclip_fast.kernels.affinity_loss as kernels

    x, y, xt, yt = make_inputs(37, 37, 24, 40, torch.float64, "cpu")
    # Rows almost orthogonal to dim 0, and five long columns along dim 0: their logits stay
    # near +-30 while the Cauchy-Schwarz shift is 100 * 30 = 3000, far past fp64 underflow.
    x[:, 0] *= 0.01
    x = F.normalize(x, dim=1)
    y[:5] = 0
    y[:5, 0] = 30.0
    y[:5] += 0.1 * torch.randn(5, 24, dtype=torch.float64)
    inputs = [t.float().to(KERNEL_DEVICE) for t in (x, y, xt, yt)]
    recomputed = []
    exact = kernels._exact_column_stats
    monkeypatch.setattr(
        kernels,
        "_exact_column_stats",
        lambda col, underflow, *args: (
            recomputed.append(underflow.nonzero().flatten().tolist()),
            exact(col, underflow, *args),
        ),
    )
    check(square=True, m=37, n=37, scale=100.0, backend="triton", device=KERNEL_DEVICE,
          inputs=inputs)  # fmt: skip
    assert recomputed == [[0, 1, 2, 3, 4]]


# ----------------------------------------------------------------------------- ensembles


def check_ensemble(
    *, square, m, n, d_s=24, d_ts=(40, 16), dtype=torch.float32, scale=10.0,
    teacher_scales=(5.0, 30.0), kind="soft_ce", label_offset=0, grads=(1.3, -0.7),
    backend="torch", device="cpu", tol=None,
):  # fmt: skip
    """An ensemble of len(d_ts) teachers (their own dims and scales) against the reference."""
    x, y = (F.normalize(torch.randn(k, d_s, dtype=torch.float64), dim=1) for k in (m, n))
    teachers = [
        [F.normalize(torch.randn(k, d, dtype=torch.float64), dim=1) for k in (m, n)] for d in d_ts
    ]
    x, y = (t.to(dtype).to(device).requires_grad_() for t in (x, y))
    teachers = [[t.to(dtype).to(device).requires_grad_() for t in pair] for pair in teachers]
    scale_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    scale_t = torch.tensor(scale, dtype=scale_dtype, device=device, requires_grad=True)
    # One teacher scale a tensor that requires grad: it must get none either.
    scales = [torch.tensor(teacher_scales[0], requires_grad=True), *teacher_scales[1:]]
    lists = [[t[0] for t in teachers], [t[1] for t in teachers], scales]
    with force_backend(backend):
        if square:
            out = affinity_loss_square(x, y, scale_t, *lists, kind=kind, compute_contrastive=True)
        else:
            out = affinity_loss_rows(
                x, y, scale_t, *lists, kind=kind, compute_contrastive=True,
                label_offset=label_offset,
            )  # fmt: skip
        (out[0] * grads[0] + out[1] * grads[1]).backward()
    assert all(t.grad is None for pair in teachers for t in pair) and scales[0].grad is None
    ref_in = [t.detach().double().cpu().requires_grad_() for t in (x, y)]
    ref_scale = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    ref_teachers = [
        (xt.detach().double().cpu(), yt.detach().double().cpu(), float(b))
        for (xt, yt), b in zip(teachers, teacher_scales, strict=True)
    ]
    ref = ensemble_reference(*ref_in, ref_scale, ref_teachers, kind, square, label_offset)
    (ref[0] * grads[0] + ref[1] * grads[1]).backward()
    tol = tol or TOLERANCE[dtype]
    assert rel_err(out[0], ref[0]) < tol
    assert rel_err(out[1], ref[1]) < tol
    assert rel_err(x.grad, ref_in[0].grad) < tol
    assert rel_err(y.grad, ref_in[1].grad) < tol
    assert rel_err(scale_t.grad, ref_scale.grad) < tol


@pytest.mark.parametrize("kind", ["soft_ce", "kl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_ensemble_square_torch(small_chunks, kind, dtype):
    check_ensemble(square=True, m=37, n=37, kind=kind, dtype=dtype)


@pytest.mark.parametrize(
    "case",
    [
        dict(d_ts=(40,), teacher_scales=(5.0,), kind="kl"),
        dict(d_ts=(40, 16, 24, 8), teacher_scales=(1.0, 100.0, 20.0, 50.0), scale=100.0),
        dict(d_ts=(40, 16, 24, 8), teacher_scales=(1.0, 100.0, 20.0, 50.0), kind="kl"),
        dict(d_ts=(40, 16), scale=1.0, grads=(-2.0, 0.0)),
    ],
)
def test_ensemble_sizes_torch(small_chunks, case):
    check_ensemble(square=True, m=37, n=37, **case)


@pytest.mark.parametrize("kind", ["soft_ce", "kl"])
def test_ensemble_rows_torch(small_chunks, kind):
    check_ensemble(square=False, m=37, n=53, label_offset=11, kind=kind)


def test_one_teacher_list_equals_the_single_teacher_exactly():
    """K = 1 as a list runs the single-teacher computation: bit-identical values and grads."""
    x, y, xt, yt = make_inputs(37, 37, 24, 40, torch.float32, "cpu")
    results = []
    for teacher in ((xt, yt, 5.0), ([xt], [yt], [5.0])):
        for kind in KINDS:
            student = [t.clone().requires_grad_() for t in (x, y)]
            with force_backend("torch"):
                dist, clip = affinity_loss_square(
                    *student, 10.0, *teacher, kind=kind, compute_contrastive=True
                )
            (dist - clip).backward()
            results.append([dist, clip, student[0].grad, student[1].grad])
    for single, listed in zip(results[:2], results[2:], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(single, listed, strict=True))


def test_identical_teachers_equal_one_teacher():
    x, y, xt, yt = make_inputs(37, 37, 24, 40, torch.float32, "cpu")
    with force_backend("torch"):
        for kind in KINDS:
            one, _ = affinity_loss_square(x, y, 10.0, xt, yt, 5.0, kind=kind)
            two, _ = affinity_loss_square(x, y, 10.0, [xt, xt], [yt, yt], [5.0, 5.0], kind=kind)
            assert rel_err(two, one) < 1e-6


def _bad_ensemble_calls():
    x, y, xt, yt = make_inputs(8, 8, 4, 6, torch.float32, "cpu")
    sq = affinity_loss_square
    return [
        (lambda: sq(x, y, 1.0, [xt, xt], [yt], [1.0, 1.0]), ValueError, "same number of teachers"),
        (lambda: sq(x, y, 1.0, [xt, xt], [yt, yt], [1.0]), ValueError, "2, 2 and 1"),
        (lambda: sq(x, y, 1.0, [xt] * 5, [yt] * 5, [1.0] * 5), ValueError, "1 to 4 teachers"),
        (lambda: sq(x, y, 1.0, [], [], []), ValueError, "got 0"),
        (lambda: sq(x, y, 1.0, [xt, xt], [yt, yt], 1.0), ValueError, "all be lists"),
        (lambda: sq(x, y, 1.0, [xt, xt], [yt, yt[:, :5]], [1, 1]), ValueError, r"\[1\] \(8, 5\)"),
        (lambda: sq(x, y, 1.0, [xt, xt[:7]], [yt, yt], [1, 1]), ValueError, r"features\[1\]"),
        (lambda: sq(x, y, 1.0, [xt, xt], [yt, yt], [1, -1]), ValueError, r"scale\[1\]"),
        (lambda: sq(x, y, 1.0, [xt, None], [yt, yt], [1, 1]), TypeError, r"features\[1\]"),
        (
            lambda: affinity_loss_rows(x[:3], y, 1.0, [xt[:3], xt], [yt, yt], [1, 1]),
            ValueError,
            r"teacher_row_features\[1\] \(8, 6\)",
        ),
    ]


@pytest.mark.parametrize("case", range(10), ids=lambda i: _case_id(_bad_ensemble_calls()[i]))
def test_bad_ensembles(case):
    call, error, pattern = _bad_ensemble_calls()[case]
    with pytest.raises(error, match=pattern):
        call()


@pytest.mark.parametrize(
    "case",
    [
        dict(square=True, m=37, n=37, kind="kl", d_ts=(40, 16)),
        dict(
            square=True,
            m=37,
            n=37,
            dtype=torch.bfloat16,
            d_ts=(40, 16, 24, 8),
            teacher_scales=(1.0, 100.0, 20.0, 50.0),
            scale=100.0,
        ),  # fmt: skip
        dict(
            square=True,
            m=37,
            n=37,
            dtype=torch.float16,
            kind="kl",
            d_ts=(40, 16, 24, 8),
            teacher_scales=(1.0, 100.0, 20.0, 50.0),
        ),  # fmt: skip
        dict(square=False, m=21, n=53, label_offset=17, kind="kl", d_ts=(40, 16)),
    ],
)
def test_ensemble_triton(case):
    check_ensemble(backend="triton", device=KERNEL_DEVICE, **case)
