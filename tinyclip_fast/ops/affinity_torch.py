"""The PyTorch path of the affinity loss: chunked over rows, for CPU tensors.

fp32 math (float64 for float64 features); the [chunk, N] blocks are allocated once per call
and reused by every chunk and teacher, so the peak memory is set by the chunk size
(``tinyclip_fast.ops.chunking``). The statistics it keeps are those of the kernels
(``AffinityStats``), so one operator serves both; see docs/method.md for the math.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tinyclip_fast.ops.affinity_checks import Teacher
from tinyclip_fast.ops.chunking import chunk_rows


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


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp32 math for fp32/bf16/fp16 inputs; float64 inputs keep float64."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


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


def torch_forward(
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
    dtype = compute_dtype(rows, cols, *(t for teacher in teachers for t in teacher[:2]))
    num_teachers = len(teachers)
    num_rows, device = rows.shape[0], rows.device
    cols_c = cols.to(dtype)
    a = scale.to(dtype)
    teachers_c = [(t_rows, t_cols.to(dtype), b.to(dtype)) for t_rows, t_cols, b in teachers]
    # One teacher's KL entropy comes from sum P B; an ensemble's needs the mixture itself.
    dot_b = kind == "kl" and num_teachers == 1
    mixture = kind == "kl" and num_teachers > 1
    step = chunk_rows(cols.shape[0])
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


def torch_backward(
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
    dtype = compute_dtype(rows, cols, *(t for teacher in teachers for t in teacher[:2]))
    device = rows.device
    cols_c = cols.to(dtype)
    teachers_c = [(t_rows, t_cols.to(dtype), b.to(dtype)) for t_rows, t_cols, b in teachers]
    # The coefficients stay 0-d tensors (read on the host, they would stall a CUDA stream and
    # break a compiled graph); the mean over the teachers goes into their coefficients.
    row_q, row_p, col_q, col_p, onehot = coeffs.to(dtype).unbind()
    row_p, col_p = row_p / max(len(teachers), 1), col_p / max(len(teachers), 1)
    a = scale.to(dtype)
    grad_rows = torch.empty(rows.shape, dtype=dtype, device=device)
    grad_cols = torch.zeros(cols.shape, dtype=dtype, device=device)
    grad_scale = torch.zeros((), dtype=dtype, device=device)
    step = chunk_rows(cols.shape[0])
    blocks = 3 if teachers else 2
    work = _Workspace(min(step, rows.shape[0]), cols.shape[0], blocks, dtype, device)
    for start in range(0, rows.shape[0], step):
        stop = min(start + step, rows.shape[0])
        grad = work.block(1, stop - start)
        logits = work.logits(0, "scaled_rows", rows, start, stop, a, cols_c)
        _, row_sum = _exp_rows(logits, grad)
        grad.mul_(row_sum.reciprocal_().mul_(row_q)[:, None])
        if col_stats is not None:
            grad.add_(logits.sub_(col_stats.lse_a[None, :]).exp_().mul_(col_q))
        for k, (t_rows, t_cols, b) in enumerate(teachers_c):
            logits = work.logits(0, f"teacher_rows{k}", t_rows, start, stop, b, t_cols)
            probs = work.block(2, stop - start)
            _, row_sum = _exp_rows(logits, probs)
            grad.sub_(probs.mul_(row_sum.reciprocal_().mul_(row_p)[:, None]))
            if col_stats is not None:
                grad.sub_(logits.sub_(col_stats.lse_b[k][None, :]).exp_().mul_(col_p))
        local, label = _labels_in_chunk(start, stop, label_offset, device)
        grad[local, label] -= onehot
        rows_chunk = work.rows("rows", rows, start, stop)
        torch.matmul(grad, cols_c, out=grad_rows[start:stop])
        grad_cols.addmm_(grad.T, rows_chunk)
        grad_scale += torch.dot(grad_rows[start:stop].flatten(), rows_chunk.flatten())
    # The scale a is folded in once at the end rather than into every chunk product.
    return grad_rows.mul_(a), grad_cols.mul_(a), grad_scale
