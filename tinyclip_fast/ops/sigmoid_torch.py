"""The PyTorch path of the sigmoid losses: chunked over rows, for CPU tensors.

fp32 math (float64 for float64 features) over [chunk, N] row blocks whose workspace is
allocated once per call (``tinyclip_fast.ops.chunking``); the contract is the kernels'
(``sigmoid_loss_tiles``), so one operator serves both. See ``tinyclip_fast.ops.sigmoid_loss``.
"""

from __future__ import annotations

import torch

from tinyclip_fast.ops.chunking import chunk_rows

# One teacher as the op sees it: its row features, column features, 0-d scale and bias.
Teacher = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def torch_tiles(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    teachers: list[Teacher],
    contrastive: bool,
    kind: str | None,
    weights: tuple[float, float],
    label_offset: int,
    grad: bool,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """The kernels' contract (``sigmoid_loss_tiles``) over [chunk, N] row blocks.

    fp32 math for fp32/bf16/fp16 inputs, float64 for float64. The workspace (two to four
    [chunk, N] buffers) is allocated once and every elementwise step writes into it.
    """
    every = [rows, cols, *(t for teacher in teachers for t in teacher[:2])]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in every) else torch.float32
    device = rows.device
    m, n = rows.shape[0], cols.shape[0]
    cols_c = cols.to(dtype)
    # The scales go on the [N, d] column operands, as 0-d tensors: never read on the host.
    cols_a = cols_c * scale.detach().to(dtype)
    c = bias.detach().to(dtype)
    prepared = [
        (t_rows, t_cols.to(dtype) * b.to(dtype), cb.to(dtype)) for t_rows, t_cols, b, cb in teachers
    ]
    distill = kind is not None
    w_c, w_d = weights
    step = min(m, chunk_rows(n))
    buffers = 2 + distill + (kind == "mobileclip")
    workspace = torch.empty(buffers, step, n, dtype=dtype, device=device)
    zero = torch.zeros((), dtype=dtype, device=device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    dx = torch.empty(m, rows.shape[1], dtype=dtype, device=device) if grad else None
    dy = torch.empty(n, cols.shape[1], dtype=dtype, device=device) if grad else None
    for start in range(0, m, step):
        stop = min(start + step, m)
        size = stop - start
        logits, work, *rest = (buffer[:size] for buffer in workspace)
        x = rows[start:stop].to(dtype)
        torch.addmm(c, x, cols_a.T, out=logits)
        # sum_j softplus(A_ij) is the loss of every negative pair and of a bce target 0.
        softplus_sum = torch.logaddexp(logits, zero, out=work).sum()
        local = torch.arange(size, device=device)
        label = local + start + label_offset
        if contrastive:
            # A positive pair's -log s(A) = softplus(A) - A.
            sums[0] += softplus_sum - logits[local, label].sum()
        if distill:
            probs = rest[0]
            for k, (t_rows, t_cols, cb) in enumerate(prepared):
                target = probs if k == 0 else work
                torch.addmm(cb, t_rows[start:stop].to(dtype), t_cols.T, out=target)
                torch.sigmoid(target, out=target)
                if k > 0:
                    probs += work
            if len(prepared) > 1:
                probs /= len(prepared)
            if kind == "mobileclip":
                target = probs.mul_(2).sub_(1)  # t = 2p - 1
                minus_u = torch.mul(target, logits, out=work).neg_()
                sums[1] += torch.logaddexp(minus_u, zero, out=rest[1]).sum()
                grad_d = torch.sigmoid(minus_u, out=work).mul_(target).neg_()  # -t s(-tA)
            else:
                # softplus(A) - p A, then the teacher entropy for "kl".
                sums[1] += softplus_sum - torch.dot(probs.reshape(-1), logits.reshape(-1))
                if kind == "kl":
                    sums[1] += torch.special.xlogy(probs, probs, out=work).sum()
                    complement = torch.neg(probs, out=work).add_(1)
                    sums[1] += torch.special.xlogy(complement, complement, out=work).sum()
        if not grad:
            continue
        # G = w_c (s(A) - onehot) + w_d g_d, built in the logits buffer.
        g = logits
        if kind == "mobileclip":
            if contrastive:
                torch.sigmoid(logits, out=g).mul_(w_c).add_(grad_d, alpha=w_d)
            else:
                g = grad_d.mul_(w_d)
        else:
            torch.sigmoid(logits, out=g).mul_(w_c + (w_d if distill else 0.0))
            if distill:
                g.sub_(probs, alpha=w_d)
        if contrastive:
            g[local, label] -= w_c
        torch.matmul(g, cols_c, out=dx[start:stop])
        if start == 0:
            torch.matmul(g.T, x, out=dy)
        else:
            dy.addmm_(g.T, x)
        sums[2] += g.sum()
        sums[3] += torch.dot(dx[start:stop].reshape(-1), x.reshape(-1))
    return sums, ((dx, dy) if grad else None)
