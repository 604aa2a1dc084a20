"""Expected sparsity of the masked towers and the Lagrangian controller that drives it
(docs/method.md §3b).

Expected remaining parameters of one tower (prunable blocks only; embeddings not counted),
with p_h [w], p_head [L, H], p_int [L, M] the non-zero probabilities of its masks:
    params_per_head = (4 w^2 + 4 w) / H        (q, k, v, out weights and biases, per head)
    attention = sum_l sum(outer(p_h, p_head[l])) * params_per_head / w
              = sum(p_h) * sum(p_head) * params_per_head / w
    mlp       = sum_l sum(outer(p_h, p_int[l])) * 2  = 2 * sum(p_h) * sum(p_int)
(a sum of an outer product is the product of the sums). With every probability 1 this is
the full count L (4 w^2 + 4 w) + 2 L w M. Expected sparsity = 1 - remaining / full, summed
jointly over the towers (image and text).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from tinyclip_fast.pruning.policy import DEFAULT_SPARSITY_CONTROL, SPARSITY_CONTROLS


@dataclass
class TowerMaskProbs:
    """Non-zero probabilities of one tower's masks: p_h [width], p_head [L, heads], p_int [L, M]."""

    p_h: torch.Tensor
    p_head: torch.Tensor
    p_int: torch.Tensor
    width: int
    heads: int

    def __post_init__(self) -> None:
        layers = self.p_head.shape[0] if self.p_head.dim() == 2 else -1
        if (
            tuple(self.p_h.shape) != (self.width,)
            or tuple(self.p_head.shape) != (layers, self.heads)
            or self.p_int.dim() != 2
            or self.p_int.shape[0] != layers
        ):
            raise ValueError(
                f"TowerMaskProbs: expected p_h [{self.width}], p_head [L, {self.heads}], "
                f"p_int [L, M]; got p_h {tuple(self.p_h.shape)}, p_head "
                f"{tuple(self.p_head.shape)}, p_int {tuple(self.p_int.shape)}"
            )


TowerLike = TowerMaskProbs | Mapping


def _as_tower(tower: TowerLike) -> TowerMaskProbs:
    return tower if isinstance(tower, TowerMaskProbs) else TowerMaskProbs(**tower)


def _params_per_head(tower: TowerMaskProbs) -> float:
    return (4 * tower.width**2 + 4 * tower.width) / tower.heads


def expected_remaining_params(towers: Iterable[TowerLike]) -> torch.Tensor:
    """Sum over towers of sum(p_h) * (sum(p_head) * params_per_head / w + 2 * sum(p_int))."""
    total = None
    for tower in map(_as_tower, towers):
        hidden = tower.p_h.sum()
        attention = hidden * tower.p_head.sum() * (_params_per_head(tower) / tower.width)
        mlp = 2 * hidden * tower.p_int.sum()
        total = attention + mlp if total is None else total + attention + mlp
    if total is None:
        raise ValueError("expected_remaining_params: no towers given")
    return total


def full_prunable_params(towers: Iterable[TowerLike]) -> int:
    """Sum over towers of L (4 w^2 + 4 w) + 2 L w M: the prunable parameters with nothing pruned."""
    total = 0
    for tower in map(_as_tower, towers):
        layers, mlp_width = tower.p_int.shape
        total += (
            layers * (4 * tower.width**2 + 4 * tower.width) + 2 * layers * tower.width * mlp_width
        )
    return total


def expected_sparsity(towers: Iterable[TowerLike]) -> torch.Tensor:
    """1 - expected_remaining_params / full_prunable_params, jointly over the towers."""
    towers = [_as_tower(t) for t in towers]
    return 1 - expected_remaining_params(towers) / full_prunable_params(towers)


# Initial (l1, l2) of each form. The authors' one-sided form starts both at 10. The two-sided
# form starts l1, the equality constraint's multiplier, at 0 (at 10 it would first push s DOWN for
# 10 / multiplier_lr steps) and l2 at 100: a stiff spring, so the multipliers need not wind up
# for s to settle at t (at 10 the masks overshoot and stay over while l1 unwinds).
INIT_MULTIPLIERS = {"one_sided": (10.0, 10.0), "two_sided": (0.0, 100.0)}
# AdamW betas of log_alpha: the authors' (torch's defaults) for the one-sided form; the
# two-sided form's masks turn within a few steps when s crosses t (beta1 0.9 coasts on for
# about ten steps: the overshoot the spring then has to undo).
MASK_BETAS = {"one_sided": (0.9, 0.999), "two_sided": (0.5, 0.999)}


class SparsityController(nn.Module):
    """Lagrangian sparsity penalty with learnable multipliers l1, l2 (maximised, not minimised).

    target t(step) = start + (target - start) * min(1, step / warmup_steps), s the expected
    sparsity (docs/method.md §3b):

    - ``"one_sided"`` (the authors' code): l1 max(t - s, 0) + l2 max(t - s, 0)^2, l1 = l2 = 10
      at the start. It pushes only while s is below t: masks that move past the target are
      not pulled back.
    - ``"two_sided"`` (the classic Lagrangian): l1 (s - t) + l2 (s - t)^2, l1 = 0 and l2 = 100
      at the start (``INIT_MULTIPLIERS``), log_alpha's AdamW with beta1 0.5 (``MASK_BETAS``).
      The quadratic term pulls s towards t from either side; l1 turns negative by ascent
      while s < t (pushing s up) and grows back once s passes t.

    The model and log_alpha minimise the penalty; l1, l2 maximise it, see
    ``build_optimizers``.
    """

    def __init__(
        self,
        target_sparsity: float,
        start_sparsity: float = 0.0,
        warmup_steps: int = 1000,
        control: str = DEFAULT_SPARSITY_CONTROL,
        init_multipliers: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        if not (0 <= start_sparsity < 1 and 0 <= target_sparsity < 1):
            raise ValueError(
                f"sparsities must be in [0, 1), got start {start_sparsity}, "
                f"target {target_sparsity}"
            )
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if control not in SPARSITY_CONTROLS:
            raise ValueError(f"control must be one of {SPARSITY_CONTROLS}, got {control!r}")
        self.target_sparsity, self.start_sparsity = target_sparsity, start_sparsity
        self.warmup_steps, self.control = warmup_steps, control
        init_l1, init_l2 = init_multipliers or INIT_MULTIPLIERS[control]
        self.lambda_1 = nn.Parameter(torch.tensor(float(init_l1)))
        self.lambda_2 = nn.Parameter(torch.tensor(float(init_l2)))

    def target_at(self, step: int) -> float:
        """t(step) = start + (target - start) * min(1, step / warmup_steps)."""
        ramp = 1.0 if self.warmup_steps == 0 else min(1.0, step / self.warmup_steps)
        return self.start_sparsity + (self.target_sparsity - self.start_sparsity) * ramp

    def forward(self, sparsity: torch.Tensor, step: int) -> torch.Tensor:
        """The penalty for expected sparsity ``sparsity`` at ``step``; add it to the loss."""
        gap = self.target_at(step) - sparsity
        if self.control == "one_sided":
            gap = gap.clamp_min(0.0)
            return self.lambda_1 * gap + self.lambda_2 * gap**2
        return self.lambda_1 * -gap + self.lambda_2 * gap**2

    def build_optimizers(
        self, log_alphas: Iterable[nn.Parameter], lr: float = 0.02, multiplier_lr: float = 0.02
    ) -> tuple[torch.optim.AdamW, torch.optim.AdamW]:
        """(AdamW over log_alpha, lr 0.02, no weight decay, the form's ``MASK_BETAS``; AdamW over
        l1, l2 doing ASCENT).

        The authors pass lr -0.02 to AdamW; torch's AdamW rejects a negative lr, so the
        multipliers' optimiser uses ``maximize=True`` with lr 0.02: the same update.
        """
        mask_optimizer = torch.optim.AdamW(
            list(log_alphas), lr=lr, betas=MASK_BETAS[self.control], weight_decay=0.0
        )
        multiplier_optimizer = torch.optim.AdamW(
            [self.lambda_1, self.lambda_2], lr=multiplier_lr, weight_decay=0.0, maximize=True
        )
        return mask_optimizer, multiplier_optimizer
