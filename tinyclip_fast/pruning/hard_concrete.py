"""Hard-concrete masks (L0 regularisation, Louizos et al.; as in CoFi / TinyCLIP).

The parameterisation of docs/method.md §3b.

One learnable ``log_alpha`` per mask entry. Training draws a reparameterised sample
    u ~ U(eps, 1 - eps),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta),
    z = clamp(s * (r - l) + l, 0, 1)
whose clamp makes exact zeros (no gradient through them). Evaluation uses a deterministic
mask with the expected number of zeros. P(z != 0) = 1 - cdf(0) feeds the sparsity penalty.
"""

from __future__ import annotations

import math

import torch
from torch import nn

LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(1e-2), math.log(1e2)
# CoFi's scaling of log_alpha for the deterministic mask's soft values.
DETERMINISTIC_SCALE = 0.8


class HardConcreteMask(nn.Module):
    """A hard-concrete mask of ``shape``; the last dimension is the group for ``deterministic``.

    forward(): a training sample when ``self.training``, else the deterministic mask.
    """

    def __init__(
        self,
        shape: int | tuple[int, ...],
        init_log_alpha: float = 10.0,
        beta: float = 2 / 3,
        limit_l: float = -0.1,
        limit_r: float = 1.1,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if not limit_l < 0 < 1 < limit_r:
            raise ValueError(f"need limit_l < 0 < 1 < limit_r, got {limit_l}, {limit_r}")
        if beta <= 0 or not 0 < eps < 0.5:
            raise ValueError(f"need beta > 0 and 0 < eps < 0.5, got beta={beta}, eps={eps}")
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if len(shape) == 0 or min(shape) <= 0:
            raise ValueError(f"shape must have at least one dimension, all positive, got {shape}")
        self.log_alpha = nn.Parameter(torch.full(shape, float(init_log_alpha)))
        self.beta, self.limit_l, self.limit_r, self.eps = beta, limit_l, limit_r, eps

    def forward(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.sample(generator) if self.training else self.deterministic()

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training sample z = clamp(sigmoid((logit(u) + log_alpha) / beta) * (r - l) + l, 0, 1).

        u ~ U(eps, 1 - eps), drawn from ``generator`` (on log_alpha's device) or the global
        RNG; gradients reach log_alpha except through the clamped entries.
        """
        u = torch.empty_like(self.log_alpha).uniform_(self.eps, 1 - self.eps, generator=generator)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        return (s * (self.limit_r - self.limit_l) + self.limit_l).clamp(0.0, 1.0)

    def prob_nonzero(self) -> torch.Tensor:
        """P(z != 0) = 1 - cdf(0), cdf(x) = sigmoid(logit((x - l) / (r - l)) * beta - log_alpha).

        At x = 0 the logit is log(-l / r), so this is sigmoid(log_alpha - beta * log(-l / r)).
        """
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.limit_l / self.limit_r))

    def deterministic(self) -> torch.Tensor:
        """soft = sigmoid(log_alpha / beta * 0.8) with the k smallest entries of each group zeroed.

        k = round(group size - sum P(nonzero)) per group (the last dimension: a layer's heads
        or MLP channels, or the whole vector for a 1-D mask). Ties break by index (stable sort).
        """
        soft = torch.sigmoid(self.log_alpha / self.beta * DETERMINISTIC_SCALE)
        with torch.no_grad():
            size = self.log_alpha.shape[-1]
            num_zeros = torch.round(size - self.prob_nonzero().sum(-1, keepdim=True))
            rank = soft.argsort(dim=-1, stable=True).argsort(dim=-1, stable=True)
            pruned = rank < num_zeros
        return soft.masked_fill(pruned, 0.0)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp log_alpha to [ln 0.01, ln 100] in place (after each optimiser step)."""
        self.log_alpha.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.log_alpha.shape)}, beta={self.beta:.4g}"
