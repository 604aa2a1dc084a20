"""Fused affinity-mimicking (distillation) and contrastive loss without [m, N] logits.

Student logits A = a X Y^T, teacher logits B_k = b_k Xt_k Yt_k^T for an ensemble of K = 1..4
teachers (each with its own feature dim and scale), targets averaged after the softmax
(MobileCLIP's ``average_after_softmax``): along a direction P = mean_k softmax(B_k), Q =
softmax(A). The soft cross-entropy of a row is ``lse(A_i) - sum_j P_ij A_ij``, which
decomposes per teacher as ``lse(A_i) - mean_k sum_j softmax(B_k)_ij A_ij``; KL(P || Q)
subtracts the teacher entropy ``-sum_j P_ij ln P_ij``; InfoNCE is ``lse(A_i) - A_i,label``.
All of them have dL/dA = Q - P (or Q - onehot), so the forward pass keeps per-row (and, for
the square problem, per-column) statistics only and the backward pass recomputes tiles from
them: extra memory is O((m + N) d) plus one bounded chunk of rows, never O(m N).

KL is exact for ensembles too: the entropy of a mixture does not decompose per teacher, so
for K >= 2 one more pass over the teacher tiles, once their log-sum-exps are known, sums
P ln P (soft-CE, the default, needs no such pass; one teacher's entropy is
lse(B_i) - sum_j P_ij B_ij, gathered in the first pass). The gradient is the same either way.

Two implementations share one autograd Function: the Triton kernels
(``tinyclip_fast.kernels.affinity_loss``, fp32 math) and a chunked PyTorch path for CPU
tensors (fp32 math, float64 for float64 features) whose [chunk, N] blocks are allocated once
per call and reused by every chunk and teacher, so its peak memory is set by the chunk size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tinyclip_fast.ops.arguments import as_list, check_features, scalar_argument
from tinyclip_fast.ops.backend import use_triton

KINDS = ("soft_ce", "kl")
# Ensemble size the kernels have argument slots for (kernels.affinity_loss.MAX_TEACHERS);
# repeated here so that CPU-only use never imports the kernels.
MAX_TEACHERS = 4

# Elements of one [chunk, N] fp32 block in the PyTorch path: 8 MB keeps the peak small
# while the chunk matmuls stay large enough to run at full speed.
_CHUNK_ELEMENTS = 1 << 21
_MIN_CHUNK_ROWS = 32
_MAX_CHUNK_ROWS = 2048

Scale = float | torch.Tensor
# One teacher as the op sees it: its row features, column features and 0-d scale.
Teacher = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class AffinityStats:
    """Per-row (or per-column) statistics of one softmax direction over its r rows.

    fp32, except on the PyTorch path for float64 features, which computes in float64.

    lse_a: log-sum-exp of the student logits [r]; target_a: the logit of the contrastive
    label [r]; lse_b: log-sum-exp of each teacher's logits [K, r]; p_dot_a: sum_j P_ij A_ij
    with P the teachers' mean softmax [r]; plogp (kind="kl" only): sum_j P_ij ln P_ij per
    row [r] for one teacher, summed over the rows too (0-d) for an ensemble, whose mixture
    entropy takes a pass of its own. Teacher fields are None when no teacher is involved.
    """

    lse_a: torch.Tensor
    target_a: torch.Tensor
    lse_b: torch.Tensor | None = None
    p_dot_a: torch.Tensor | None = None
    plogp: torch.Tensor | None = None


# ----------------------------------------------------------------------------- validation


def _check_scale(name: str, scale: object, device: torch.device) -> torch.Tensor:
    """A finite positive Python number or one-element floating tensor, as a 0-d tensor on
    device. A scale is multiplicative (``exp(logit_scale)``): 0, a negative or a non-finite
    value is a mistake (often the log-space parameter passed as is); checking a tensor's value
    reads it on the host once per call."""
    tensor, value = scalar_argument(name, scale, read_device=True)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"{name} must be a finite multiplicative scale > 0 (exp of the log-space "
            f"logit_scale), got {value}"
        )
    if tensor is None:
        # float64 keeps the scale exact for float64 features; the other paths cast it down.
        return torch.tensor(value, dtype=torch.float64, device=device)
    return tensor.reshape(()).to(device)


def _validate_teachers(
    named_teacher: list[tuple[str, object]], named_student: list[tuple[str, torch.Tensor]]
) -> list[tuple[str, torch.Tensor, str, torch.Tensor, str, object]]:
    """The teachers as (rows name, rows, cols name, cols, scale name, scale), K = 1..4.

    One teacher comes as tensors and a scale, an ensemble as three lists of equal length.
    """
    (trow_name, trows), (tcol_name, tcols), (tscale_name, tscales) = named_teacher
    if trows is None or tcols is None or tscales is None:
        raise ValueError(f"compute_distill=True needs {trow_name}, {tcol_name} and {tscale_name}")
    (rows_list, rows_is_list), (cols_list, cols_is_list), (scales_list, scales_is_list) = (
        as_list(trows), as_list(tcols), as_list(tscales)
    )  # fmt: skip
    if not rows_is_list == cols_is_list == scales_is_list:
        raise ValueError(
            f"{trow_name}, {tcol_name} and {tscale_name} must all be lists (an ensemble, one "
            "entry per teacher) or all single values (one teacher)"
        )
    if not len(rows_list) == len(cols_list) == len(scales_list):
        raise ValueError(
            f"{trow_name}, {tcol_name} and {tscale_name} must list the same number of "
            f"teachers, got {len(rows_list)}, {len(cols_list)} and {len(scales_list)}"
        )
    if not 1 <= len(rows_list) <= MAX_TEACHERS:
        raise ValueError(
            f"an ensemble has 1 to {MAX_TEACHERS} teachers, got {len(rows_list)} in {trow_name}"
        )
    suffix = (lambda k: f"[{k}]") if rows_is_list else (lambda k: "")
    (row_name, rows), (col_name, cols) = named_student
    teachers = []
    for k, (teacher_rows, teacher_cols, scale) in enumerate(
        zip(rows_list, cols_list, scales_list, strict=True)
    ):
        names = (trow_name + suffix(k), tcol_name + suffix(k), tscale_name + suffix(k))
        teacher_rows = check_features(names[0], teacher_rows)
        teacher_cols = check_features(names[1], teacher_cols)
        if teacher_rows.shape[1] != teacher_cols.shape[1]:
            raise ValueError(
                f"{names[0]} {tuple(teacher_rows.shape)} and {names[1]} "
                f"{tuple(teacher_cols.shape)} must have the same feature dimension"
            )
        for (s_name, s), (t_name, t) in (
            ((row_name, rows), (names[0], teacher_rows)),
            ((col_name, cols), (names[1], teacher_cols)),
        ):
            if s.shape[0] != t.shape[0]:
                raise ValueError(
                    f"{s_name} {tuple(s.shape)} and {t_name} {tuple(t.shape)} must have the "
                    "same batch size"
                )
        teachers.append((names[0], teacher_rows, names[1], teacher_cols, names[2], scale))
    return teachers


def _validate(
    student: list[tuple[str, object]],
    teacher: list[tuple[str, object]],
    square: bool,
    kind: str,
    compute_distill: bool,
) -> tuple[torch.Tensor, torch.Tensor, list[Teacher]]:
    """Checked (rows, cols, teachers); teachers are detached, their scales 0-d tensors."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    (row_name, rows), (col_name, cols) = student[:2]
    rows, cols = check_features(row_name, rows), check_features(col_name, cols)
    named = [(row_name, rows), (col_name, cols)]
    if rows.shape[1] != cols.shape[1]:
        raise ValueError(
            f"{row_name} {tuple(rows.shape)} and {col_name} {tuple(cols.shape)} must have the "
            "same feature dimension"
        )
    if square and rows.shape[0] != cols.shape[0]:
        raise ValueError(
            f"{row_name} {tuple(rows.shape)} and {col_name} {tuple(cols.shape)} must have the "
            "same batch size"
        )
    checked = _validate_teachers(teacher, named) if compute_distill else []
    for trow_name, teacher_rows, tcol_name, teacher_cols, _, _ in checked:
        named += [(trow_name, teacher_rows), (tcol_name, teacher_cols)]
    device = rows.device
    for name, tensor in named:
        if tensor.device != device:
            raise ValueError(
                f"all features must be on one device: {row_name} is on {device}, "
                f"{name} is on {tensor.device}"
            )
    # The teachers never receive gradients, even when their tensors require them.
    teachers = [
        (t_rows.detach(), t_cols.detach(), _check_scale(s_name, s, device).detach())
        for _, t_rows, _, t_cols, s_name, s in checked
    ]
    return rows, cols, teachers


# ----------------------------------------------------------------------------- PyTorch path


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp32 math for fp32/bf16/fp16 inputs; float64 inputs keep float64."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _chunk_rows(num_cols: int) -> int:
    rows = _CHUNK_ELEMENTS // max(num_cols, 1)
    return max(_MIN_CHUNK_ROWS, min(_MAX_CHUNK_ROWS, rows))


class _Workspace:
    """The buffers of one call, allocated once and reused by every row chunk.

    ``blocks`` [chunk, N] tiles in one allocation (so that the C allocator hands the same
    memory back call after call instead of fragmenting it), and per feature tensor a
    [chunk, d] buffer for its rows in the compute dtype, scaled or not. Every chunk
    writes into these with ``out=`` and in-place ops: the peak is set by the chunk size.
    """

    def __init__(self, chunk: int, num_cols: int, blocks: int, dtype, device) -> None:
        self.dtype, self.device, self.chunk = dtype, device, chunk
        self._blocks = torch.empty(blocks, chunk, num_cols, dtype=dtype, device=device)
        self._rows: dict[str, torch.Tensor] = {}

    def block(self, index: int, size: int) -> torch.Tensor:
        return self._blocks[index, :size]

    def rows(self, name: str, features: torch.Tensor, start: int, stop: int, scale=None):
        """features[start:stop] in the compute dtype, times ``scale`` if given."""
        view = features[start:stop]
        if scale is None and view.dtype == self.dtype:
            return view
        if name not in self._rows:
            self._rows[name] = torch.empty(
                self.chunk, features.shape[1], dtype=self.dtype, device=self.device
            )
        buffer = self._rows[name][: stop - start]
        if view.dtype != self.dtype:
            view = buffer.copy_(view)
        return view if scale is None else torch.mul(view, scale, out=buffer)

    def logits(self, index: int, name: str, rows, start, stop, scale, cols) -> torch.Tensor:
        """Block ``index`` := (rows[start:stop] * scale) @ cols^T; the scale goes on the
        [chunk, d] operand, not on the [chunk, N] product."""
        out = self.block(index, stop - start)
        return torch.matmul(self.rows(name, rows, start, stop, scale), cols.T, out=out)


def _exp_rows(logits: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """out := exp(logits - rowmax); returns (rowmax, rowsum of out). NaN propagates."""
    row_max = torch.amax(logits, dim=1)
    torch.sub(logits, row_max[:, None], out=out).exp_()
    return row_max, out.sum(dim=1)


def _row_dot(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """sum_j first_ij second_ij for each row i, as batched GEMVs (no [chunk, N] temporary)."""
    return torch.bmm(first.unsqueeze(1), second.unsqueeze(2)).reshape(-1)


def _labels_in_chunk(start: int, stop: int, label_offset: int, device: torch.device):
    """(row index within chunk, column index) of each contrastive label in rows start:stop."""
    local = torch.arange(stop - start, device=device)
    return local, local + start + label_offset


class _OnlineColumnSoftmax:
    """Running column log-sum-exp (and per-teacher weighted sums) over row chunks.

    Each column keeps its running max; when a chunk raises it, the sums are rescaled by
    exp(old - new), as in flash attention. The first chunk initialises the max so that no
    exp(-inf - -inf) ever occurs; NaN propagates through torch.maximum. Per teacher k:
    max, sum exp(B_k), sum exp(B_k) A and, with ``dot_b``, sum exp(B_k) B_k.
    """

    def __init__(self, num_teachers: int, dot_b: bool) -> None:
        self.max_a = self.sum_a = None
        self.teachers: list[list] = [[None, None, None, None] for _ in range(num_teachers)]
        self.dot_b = dot_b

    @staticmethod
    def _raise_max(old_max, chunk_max, sums):
        if old_max is None:
            return chunk_max, [torch.zeros_like(chunk_max) for _ in sums]
        new_max = torch.maximum(old_max, chunk_max)
        rescale = torch.exp(old_max - new_max)
        return new_max, [v.mul_(rescale) if v is not None else None for v in sums]

    def update_student(self, logits_a, scratch) -> None:
        """Add one chunk's student columns; overwrites ``scratch``."""
        self.max_a, (self.sum_a,) = self._raise_max(self.max_a, logits_a.amax(dim=0), [self.sum_a])
        self.sum_a += torch.sub(logits_a, self.max_a, out=scratch).exp_().sum(dim=0)

    def update_teacher(self, k: int, logits_a, logits_b, scratch) -> None:
        """Add teacher k's chunk columns; overwrites ``logits_b`` and ``scratch``, keeps A."""
        state = self.teachers[k]
        max_b, sums = self._raise_max(state[0], logits_b.amax(dim=0), state[1:])
        sum_b, w_a, w_b = sums
        weights = torch.sub(logits_b, max_b, out=scratch).exp_()
        sum_b += weights.sum(dim=0)
        if self.dot_b:
            w_b += logits_b.mul_(weights).sum(dim=0)
        w_a += weights.mul_(logits_a).sum(dim=0)
        self.teachers[k] = [max_b, sum_b, w_a, w_b if self.dot_b else None]

    def finish(self, target_a: torch.Tensor) -> AffinityStats:
        stats = AffinityStats(lse_a=self.max_a + torch.log(self.sum_a), target_a=target_a)
        if self.teachers:
            stats.lse_b = torch.stack(
                [max_b + torch.log(sum_b) for max_b, sum_b, _, _ in self.teachers]
            )
            stats.p_dot_a = sum(w_a / sum_b for _, sum_b, w_a, _ in self.teachers) / len(
                self.teachers
            )
            if self.dot_b:
                _, sum_b, _, w_b = self.teachers[0]
                stats.plogp = w_b / sum_b - stats.lse_b[0]
        return stats


def _torch_forward(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    teachers: list[Teacher],
    square: bool,
    label_offset: int,
    kind: str,
) -> tuple[AffinityStats, AffinityStats | None]:
    """Row statistics (and column statistics when square) over row chunks of [chunk, N].

    Per chunk: A into block 0 and exp(A - rowmax) into the scratch block for the row
    log-sum-exp; then per teacher B_k into block 1, exp(B_k - rowmax) into the scratch for
    its weighted sums, and the column update reuses both; the student tile stays in block 0
    for every teacher. KL of an ensemble adds the mixture block (mean_k P_k of the rows).
    Nothing of size [chunk, N] is allocated inside the loop.
    """
    dtype = _compute_dtype(rows, cols, *(t for teacher in teachers for t in teacher[:2]))
    num_teachers = len(teachers)
    num_rows, device = rows.shape[0], rows.device
    cols_c = cols.to(dtype)
    a = scale.to(dtype)
    teachers_c = [(t_rows, t_cols.to(dtype), b.to(dtype)) for t_rows, t_cols, b in teachers]
    # One teacher's KL entropy comes from sum P B; an ensemble's needs the mixture itself.
    dot_b = kind == "kl" and num_teachers == 1
    mixture = kind == "kl" and num_teachers > 1
    step = _chunk_rows(cols.shape[0])
    blocks = (3 if teachers else 2) + mixture
    work = _Workspace(min(step, num_rows), cols.shape[0], blocks, dtype, device)
    empty = lambda *shape: torch.empty(*shape, dtype=dtype, device=device)
    row_stats = AffinityStats(lse_a=empty(num_rows), target_a=empty(num_rows))
    if teachers:
        row_stats.lse_b = empty(num_teachers, num_rows)
        row_stats.p_dot_a = torch.zeros(num_rows, dtype=dtype, device=device)
        if dot_b:
            row_stats.plogp = empty(num_rows)
        if mixture:
            row_stats.plogp = torch.zeros((), dtype=dtype, device=device)
    columns = _OnlineColumnSoftmax(num_teachers, dot_b) if square else None
    for start in range(0, num_rows, step):
        stop = min(start + step, num_rows)
        scratch = work.block(2 if teachers else 1, stop - start)
        logits_a = work.logits(0, "rows", rows, start, stop, a, cols_c)
        row_max, row_sum = _exp_rows(logits_a, scratch)
        torch.add(row_max, row_sum.log_(), out=row_stats.lse_a[start:stop])
        local, label = _labels_in_chunk(start, stop, label_offset, device)
        row_stats.target_a[start:stop] = logits_a[local, label]
        if columns is not None:
            columns.update_student(logits_a, scratch)
        if mixture:
            mix = work.block(3, stop - start).zero_()
        for k, (t_rows, t_cols, b) in enumerate(teachers_c):
            logits_b = work.logits(1, f"teacher_rows{k}", t_rows, start, stop, b, t_cols)
            row_max, row_sum = _exp_rows(logits_b, scratch)
            row_stats.p_dot_a[start:stop] += _row_dot(scratch, logits_a).div_(row_sum)
            if dot_b:
                torch.div(_row_dot(scratch, logits_b), row_sum, out=row_stats.plogp[start:stop])
            if mixture:
                mix.addcmul_(scratch, row_sum.reciprocal()[:, None])
            torch.add(row_max, row_sum.log_(), out=row_stats.lse_b[k, start:stop])
            if columns is not None:
                columns.update_teacher(k, logits_a, logits_b, scratch)
        if mixture:
            mix.div_(num_teachers)
            row_stats.plogp += torch.special.xlogy(mix, mix, out=scratch).sum()
    if teachers:
        row_stats.p_dot_a.div_(num_teachers)
        if dot_b:
            row_stats.plogp.sub_(row_stats.lse_b[0])
    col_stats = columns.finish(row_stats.target_a) if square else None
    if mixture and square:
        col_stats.plogp = _torch_column_mixture_plogp(rows.shape[0], teachers_c, col_stats, work)
    return row_stats, col_stats


def _torch_column_mixture_plogp(num_rows, teachers, col_stats, work) -> torch.Tensor:
    """sum_ij Pbar'_ij ln Pbar'_ij with Pbar' = mean_k of the teachers' column softmaxes, a
    second pass over the row chunks once their column log-sum-exps are known."""
    total = torch.zeros((), dtype=work.dtype, device=work.device)
    for start in range(0, num_rows, work.chunk):
        stop = min(start + work.chunk, num_rows)
        mix = work.block(3, stop - start).zero_()
        for k, (t_rows, t_cols, b) in enumerate(teachers):
            logits_b = work.logits(1, f"teacher_rows{k}", t_rows, start, stop, b, t_cols)
            mix += logits_b.sub_(col_stats.lse_b[k][None, :]).exp_()
        mix.div_(len(teachers))
        total += torch.special.xlogy(mix, mix, out=work.block(2, stop - start)).sum()
    return total


def _torch_backward(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    teachers: list[Teacher],
    row_stats: AffinityStats,
    col_stats: AffinityStats | None,
    coeffs: torch.Tensor,
    label_offset: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/drows, dL/dcols, dL/dscale) in the compute dtype, recomputing [chunk, N] tiles.

    dA = Q cq - P cp + Q' cq' - P' cp' - onehot c1 with coeffs = (cq, cp, cq', cp', c1) and
    P = mean_k P_k; drows = a dA cols, dcols = a dA^T rows, dscale = sum(dA * rows cols^T)
    = sum_i rows_i . (dA cols)_i, which needs no [chunk, N] product. The row softmaxes are
    renormalised from a fresh row max, the column ones taken from the saved log-sum-exps.
    Blocks: the logits (the student's, then each teacher's), dA, and each teacher's row
    softmax in turn.
    """
    dtype = _compute_dtype(rows, cols, *(t for teacher in teachers for t in teacher[:2]))
    device = rows.device
    cols_c = cols.to(dtype)
    teachers_c = [(t_rows, t_cols.to(dtype), b.to(dtype)) for t_rows, t_cols, b in teachers]
    # Python floats let every scaled add below be one fused pass (alpha=...); the mean over
    # the teachers goes into their coefficients.
    row_q, row_p, col_q, col_p, onehot = coeffs.double().tolist()
    row_p, col_p = row_p / max(len(teachers), 1), col_p / max(len(teachers), 1)
    a = scale.to(dtype)
    grad_rows = torch.empty(rows.shape, dtype=dtype, device=device)
    grad_cols = torch.zeros(cols.shape, dtype=dtype, device=device)
    grad_scale = torch.zeros((), dtype=dtype, device=device)
    step = _chunk_rows(cols.shape[0])
    blocks = 3 if teachers else 2
    work = _Workspace(min(step, rows.shape[0]), cols.shape[0], blocks, dtype, device)
    for start in range(0, rows.shape[0], step):
        stop = min(start + step, rows.shape[0])
        grad = work.block(1, stop - start)
        logits = work.logits(0, "scaled_rows", rows, start, stop, a, cols_c)
        _, row_sum = _exp_rows(logits, grad)
        grad.mul_(row_sum.reciprocal_().mul_(row_q)[:, None])
        if col_stats is not None:
            grad.add_(logits.sub_(col_stats.lse_a[None, :]).exp_(), alpha=col_q)
        for k, (t_rows, t_cols, b) in enumerate(teachers_c):
            logits = work.logits(0, f"teacher_rows{k}", t_rows, start, stop, b, t_cols)
            probs = work.block(2, stop - start)
            _, row_sum = _exp_rows(logits, probs)
            grad.sub_(probs.mul_(row_sum.reciprocal_().mul_(row_p)[:, None]))
            if col_stats is not None:
                grad.add_(logits.sub_(col_stats.lse_b[k][None, :]).exp_(), alpha=-col_p)
        local, label = _labels_in_chunk(start, stop, label_offset, device)
        grad[local, label] -= onehot
        rows_chunk = work.rows("rows", rows, start, stop)
        torch.matmul(grad, cols_c, out=grad_rows[start:stop])
        grad_cols.addmm_(grad.T, rows_chunk)
        grad_scale += torch.dot(grad_rows[start:stop].flatten(), rows_chunk.flatten())
    # The scale a is folded in once at the end rather than into every chunk product.
    return grad_rows.mul_(a), grad_cols.mul_(a), grad_scale


# ----------------------------------------------------------------------------- autograd


def _forward_stats(rows, cols, scale, teachers, square, offset, kind):
    if not use_triton(rows):
        return _torch_forward(rows, cols, scale, teachers, square, offset, kind)
    from tinyclip_fast.kernels.affinity_loss import affinity_stats_forward, mixture_entropy

    pairs = [(t_rows, t_cols) for t_rows, t_cols, _ in teachers]
    scales = torch.stack([b.float() for _, _, b in teachers]) if teachers else None
    row, col = affinity_stats_forward(
        rows, cols, scale, pairs, scales, column_stats=square, label_offset=offset
    )
    stats = [_kernel_stats(*row, kind), _kernel_stats(*col, kind) if col is not None else None]
    if kind == "kl" and len(teachers) > 1:
        col_lse_b = stats[1].lse_b if square else None
        row_plogp, col_plogp = mixture_entropy(pairs, scales, stats[0].lse_b, col_lse_b)
        stats[0].plogp = row_plogp.float()
        if square:
            stats[1].plogp = col_plogp.float()
    return stats[0], stats[1]


def _kernel_stats(lse_a, target_a, lse_b, p_dot_a, p_dot_b, kind: str) -> AffinityStats:
    """The kernels' per-teacher statistics as AffinityStats (p_dot_a averaged over them)."""
    stats = AffinityStats(lse_a, target_a)
    if lse_b is not None:
        stats.lse_b, stats.p_dot_a = lse_b, p_dot_a.mean(dim=0)
        if kind == "kl" and p_dot_b is not None:
            stats.plogp = p_dot_b - lse_b[0]
    return stats


def _backward_grads(rows, cols, scale, teachers, row_stats, col_stats, coeffs, offset):
    if not use_triton(rows):
        return _torch_backward(rows, cols, scale, teachers, row_stats, col_stats, coeffs, offset)
    from tinyclip_fast.kernels.affinity_loss import affinity_grad_backward

    return affinity_grad_backward(
        rows, cols, scale, [(t_rows, t_cols) for t_rows, t_cols, _ in teachers],
        torch.stack([b.float() for _, _, b in teachers]) if teachers else None,
        row_stats.lse_a, row_stats.lse_b,
        col_stats.lse_a if col_stats is not None else None,
        col_stats.lse_b if col_stats is not None else None,
        coeffs, label_offset=offset,
    )  # fmt: skip


def _direction_losses(stats: AffinityStats, kind: str) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Mean distillation loss over the direction's rows (None without teachers) and the
    per-row InfoNCE loss. KL adds sum_j P_ij ln P_ij: per row for one teacher, the
    direction's total for an ensemble."""
    infonce = stats.lse_a - stats.target_a
    if stats.lse_b is None:
        return None, infonce
    distill = stats.lse_a - stats.p_dot_a
    if kind == "kl" and stats.plogp.dim() == 1:
        distill = distill + stats.plogp
    distill = distill.mean()
    if kind == "kl" and stats.plogp.dim() == 0:
        distill = distill + stats.plogp / stats.lse_a.shape[0]
    return distill, infonce


def _flatten(teachers: list[Teacher]) -> list[torch.Tensor]:
    return [t for teacher in teachers for t in teacher]


def _unflatten(flat) -> list[Teacher]:
    return [tuple(flat[i : i + 3]) for i in range(0, len(flat), 3)]


class _AffinityLoss(torch.autograd.Function):
    """(distill, contrastive) of the square or rectangular problem; see the module docstring.

    The K teachers come last, flattened as (rows, cols, scale) triples: autograd sees every
    tensor input (none of them gets a gradient).
    """

    @staticmethod
    def forward(
        ctx,
        rows: torch.Tensor,
        cols: torch.Tensor,
        scale: torch.Tensor,
        kind: str,
        compute_distill: bool,
        compute_contrastive: bool,
        square: bool,
        label_offset: int,
        *teacher_tensors: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        teachers = _unflatten(teacher_tensors)
        row_stats, col_stats = _forward_stats(
            rows, cols, scale, teachers, square, label_offset, kind
        )
        # A float64 loss for float64 features (computed in float64 on the PyTorch path and
        # in fp32 by the kernels); fp32 for every other dtype.
        dtype = _compute_dtype(rows, cols, *(t for teacher in teachers for t in teacher[:2]))
        zero = torch.zeros((), dtype=dtype, device=rows.device)
        distill, contrastive = zero, zero.clone()
        row_distill, row_infonce = _direction_losses(row_stats, kind)
        if square:
            col_distill, col_infonce = _direction_losses(col_stats, kind)
            if compute_distill:
                distill = (row_distill + col_distill) / 2
            if compute_contrastive:
                contrastive = (row_infonce.mean() + col_infonce.mean()) / 2
        else:
            if compute_distill:
                distill = row_distill
            if compute_contrastive:
                contrastive = row_infonce.mean()
        ctx.save_for_backward(rows, cols, scale, *teacher_tensors)
        ctx.stats = (row_stats, col_stats)
        ctx.config = (compute_distill, compute_contrastive, square, label_offset)
        return distill.to(dtype), contrastive.to(dtype)

    @staticmethod
    def backward(ctx, grad_distill: torch.Tensor, grad_contrastive: torch.Tensor):
        rows, cols, scale, *teacher_tensors = ctx.saved_tensors
        teachers = _unflatten(teacher_tensors)
        row_stats, col_stats = ctx.stats
        compute_distill, compute_contrastive, square, label_offset = ctx.config
        # dL/dA per direction is g_d (Q - P) + g_c (Q - onehot), divided by the rows averaged
        # over; the square loss averages two directions, hence 2n.
        dtype = _compute_dtype(rows, cols, *(t for teacher in teachers for t in teacher[:2]))
        g_d = grad_distill.to(dtype) if compute_distill else grad_distill.new_zeros((), dtype=dtype)
        g_c = grad_contrastive.to(dtype) if compute_contrastive else g_d.new_zeros(())
        num = rows.shape[0] * (2 if square else 1)
        row_q, row_p = (g_d + g_c) / num, g_d / num
        col_q, col_p = (row_q, row_p) if square else (row_q * 0, row_p * 0)
        onehot = g_c * (2 if square else 1) / num
        coeffs = torch.stack([row_q, row_p, col_q, col_p, onehot])
        with torch.autocast(rows.device.type, enabled=False):  # as in the forward
            grad_rows, grad_cols, grad_scale = _backward_grads(
                rows, cols, scale, teachers, row_stats, col_stats, coeffs, label_offset
            )
        return (
            grad_rows.to(rows.dtype) if ctx.needs_input_grad[0] else None,
            grad_cols.to(cols.dtype) if ctx.needs_input_grad[1] else None,
            grad_scale.to(scale.dtype) if ctx.needs_input_grad[2] else None,
            *([None] * (5 + len(teacher_tensors))),
        )


def _affinity_loss(
    named_student, named_teacher, scale, kind, compute_distill, compute_contrastive, square,
    label_offset,
):  # fmt: skip
    rows, cols, teachers = _validate(named_student, named_teacher, square, kind, compute_distill)
    scale = _check_scale(named_student[2][0], scale, rows.device)
    if compute_contrastive and not 0 <= label_offset <= cols.shape[0] - rows.shape[0]:
        raise ValueError(
            f"label_offset={label_offset} puts labels of {rows.shape[0]} rows outside the "
            f"{cols.shape[0]} columns of {named_student[1][0]} {tuple(cols.shape)}"
        )
    # The losses are fp32 sums over N columns: under autocast the matmuls would run (and the
    # values round) in bf16/fp16. Inputs keep their dtype; the math runs in fp32 regardless.
    with torch.autocast(rows.device.type, enabled=False):
        return _AffinityLoss.apply(
            rows, cols, scale, kind, compute_distill, compute_contrastive, square,
            label_offset, *_flatten(teachers),
        )  # fmt: skip


# ----------------------------------------------------------------------------- public API

# One teacher's features and scale, or lists of K <= 4 teachers' (an ensemble).
TeacherFeatures = torch.Tensor | Sequence[torch.Tensor]
TeacherScale = Scale | Sequence[Scale]


def affinity_loss_square(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scale,
    teacher_image_features: TeacherFeatures | None = None,
    teacher_text_features: TeacherFeatures | None = None,
    teacher_logit_scale: TeacherScale | None = None,
    *,
    kind: str = "soft_ce",
    compute_distill: bool = True,
    compute_contrastive: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One device, n rows = n columns: ``(distill, contrastive)``, 0-d fp32 tensors.

    distill = (mean_i rowloss(A, B) + mean_j colloss(A, B)) / 2 with rowloss the soft
    cross-entropy -sum_j P_ij log softmax(A)_ij (or KL(P || softmax(A))), P = softmax(B) of
    one teacher or, for teacher lists (an ensemble of K <= 4, each its own feature dim and
    scale), mean_k softmax(B_k); contrastive = (CE(A, diag) + CE(A^T, diag)) / 2. Terms not
    requested are 0-d zeros. ``logit_scale`` is the multiplicative scale a (already
    exponentiated), as in open_clip. Float64 features give float64 losses: computed in
    float64 on the PyTorch (CPU) path, in fp32 by the Triton kernels.
    """
    return _affinity_loss(
        [("image_features", image_features), ("text_features", text_features),
         ("logit_scale", logit_scale)],
        [("teacher_image_features", teacher_image_features),
         ("teacher_text_features", teacher_text_features),
         ("teacher_logit_scale", teacher_logit_scale)],
        logit_scale, kind, compute_distill, compute_contrastive, square=True, label_offset=0,
    )  # fmt: skip


def affinity_loss_rows(
    row_features: torch.Tensor,
    col_features: torch.Tensor,
    logit_scale: Scale,
    teacher_row_features: TeacherFeatures | None = None,
    teacher_col_features: TeacherFeatures | None = None,
    teacher_logit_scale: TeacherScale | None = None,
    *,
    kind: str = "soft_ce",
    compute_distill: bool = True,
    compute_contrastive: bool = False,
    label_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectangular [m, N] problem, softmax along the N columns only (open_clip local loss).

    Returns ``(mean_i distill_i, mean_i infonce_i)`` where infonce_i = lse(A_i) -
    A_{i, label_offset + i}; teachers as in ``affinity_loss_square`` (lists: an ensemble).
    Gradients reach row_features, col_features and logit_scale.
    """
    return _affinity_loss(
        [("row_features", row_features), ("col_features", col_features),
         ("logit_scale", logit_scale)],
        [("teacher_row_features", teacher_row_features),
         ("teacher_col_features", teacher_col_features),
         ("teacher_logit_scale", teacher_logit_scale)],
        logit_scale, kind, compute_distill, compute_contrastive, square=False,
        label_offset=label_offset,
    )  # fmt: skip


def affinity_mimicking_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scale,
    teacher_image_features: TeacherFeatures,
    teacher_text_features: TeacherFeatures,
    teacher_logit_scale: TeacherScale,
    *,
    contrastive_weight: float = 0.0,
    kind: str = "soft_ce",
) -> torch.Tensor:
    """TinyCLIP's loss on one device: (1 - w) L_dist + w L_clip as a 0-d tensor (fp32, or
    float64 for float64 features), with w = ``contrastive_weight`` in [0, 1] (the meaning
    ``AffinityMimickingLoss`` and the engine's ``loss.contrastive_weight`` give it too).
    Teacher lists distil from an ensemble (targets averaged after the softmax)."""
    check_contrastive_weight(contrastive_weight)
    distill, contrastive = affinity_loss_square(
        image_features, text_features, logit_scale,
        teacher_image_features, teacher_text_features, teacher_logit_scale,
        kind=kind, compute_distill=True, compute_contrastive=contrastive_weight != 0,
    )  # fmt: skip
    if contrastive_weight == 0:
        return distill
    return (1 - contrastive_weight) * distill + contrastive_weight * contrastive


def check_contrastive_weight(weight: object) -> float:
    """``weight`` as a float in [0, 1]; TypeError/ValueError otherwise."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise TypeError(f"contrastive_weight must be a float in [0, 1], got {weight!r}")
    if not 0.0 <= weight <= 1.0:  # NaN fails this too
        raise ValueError(f"contrastive_weight must lie in [0, 1], got {weight}")
    return float(weight)
