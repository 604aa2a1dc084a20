"""An automatic-inheritance stage's sparsity policy: the Lagrangian's form, when the stage
prunes its masks, and whether the prune met its target (docs/method.md §3b). No torch here:
the configuration validates against these names without importing it.

``prune_step = "auto"``: prune at the first step, once the sparsity target's warm-up is over,
where the masks' expected sparsity has held within ``tolerance`` of the target for
``hold_steps`` steps in a row; at ``last_step`` at the latest (with a warning line). A fixed
prune step is the same object with ``auto=False``: it fires at ``last_step``.

The engine asks at the top of every stage step k (k mask-learning steps done) with the masks'
expected sparsity then, in the frame of the target (the fraction of the original model's
prunable parameters). The count of steps held so far is the whole state: a checkpoint taken
between two steps resumes the decision exactly.
"""

from __future__ import annotations

from typing import Any

# The Lagrangian's forms (pruning/sparsity.py's SparsityController). The two-sided form holds
# the target from both sides; the one-sided form (the authors') lets the masks overshoot.
SPARSITY_CONTROLS = ("one_sided", "two_sided")
DEFAULT_SPARSITY_CONTROL = "two_sided"
# An auto stage that pruned at less than this share of its target gets a warning line.
FAR_BELOW_TARGET = 0.8
# An auto stage whose expected sparsity is more than this above its target (a fraction of the
# original model's prunable parameters) gets a warning line.
OVERSHOOT_MARGIN = 0.05
# Within this much of the target (a fraction of the original's prunable parameters) the
# expected sparsity counts as held.
DEFAULT_TOLERANCE = 0.02
# Steps in a row the expected sparsity must hold within the tolerance before "auto" prunes.
DEFAULT_HOLD_STEPS = 3


class PruneTrigger:
    """Decides the prune step of one auto stage; ``reason`` says how it was chosen."""

    def __init__(
        self,
        target: float,
        last_step: int,
        *,
        auto: bool = True,
        tolerance: float = DEFAULT_TOLERANCE,
        hold_steps: int = DEFAULT_HOLD_STEPS,
        warmup_steps: int = 0,
    ) -> None:
        if last_step < 1:
            raise ValueError(f"the last prune step must be >= 1, got {last_step}")
        if last_step < warmup_steps:
            raise ValueError(
                f"the last prune step {last_step} comes before the sparsity target's warm-up "
                f"(sparsity_warmup) ends at step {warmup_steps}: the masks would be pruned "
                "while the target still ramps up"
            )
        if auto:
            if not 0 < tolerance < 1:
                raise ValueError(f"sparsity_tolerance must be in (0, 1), got {tolerance}")
            if hold_steps < 1:
                raise ValueError(f"prune_hold_steps must be >= 1, got {hold_steps}")
        self.target, self.last_step, self.auto = target, last_step, auto
        self.tolerance, self.hold_steps, self.warmup_steps = tolerance, hold_steps, warmup_steps
        self.held = 0  # steps in a row, up to the last one asked, within the tolerance
        self.asked = -1  # the last step asked about
        self.reason: str | None = None  # set when it fires
        self.warning: str | None = None  # set when "auto" fires at last_step, target not held

    def should_prune(self, step: int, sparsity: float) -> bool:
        """Whether to prune now, at stage step ``step``, the masks at expected ``sparsity``."""
        if step <= self.asked:
            raise ValueError(f"PruneTrigger: step {step} asked after step {self.asked}")
        self.asked = step
        if not self.auto:
            if step >= self.last_step:
                self.reason = f"the configured prune step {self.last_step}"
                return True
            return False
        self.held = self.held + 1 if abs(sparsity - self.target) <= self.tolerance else 0
        if step >= self.warmup_steps and self.held >= self.hold_steps:
            self.reason = (
                f"auto: held within {self.tolerance:.1%} of the target for {self.hold_steps} steps"
            )
            return True
        if step >= self.last_step:
            self.reason = f"auto: the last allowed prune step {self.last_step}"
            self.warning = (
                f"the expected sparsity did not hold within {self.tolerance:.1%} of its target "
                f"{self.target:.1%} for {self.hold_steps} steps by step {self.last_step}, the "
                "last allowed prune step: pruned there"
            )
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"held": self.held, "asked": self.asked}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.held, self.asked = int(state["held"]), int(state["asked"])


def target_miss(expected: float, target: float, margin: float = OVERSHOOT_MARGIN) -> str | None:
    """How a prune at expected sparsity ``expected`` missed ``target``: ``"under"`` below
    FAR_BELOW_TARGET * target, ``"over"`` above target + ``margin``, None otherwise (the
    ``target_miss`` field of the engine's prune record)."""
    if expected < FAR_BELOW_TARGET * target:
        return "under"
    if expected > target + margin:
        return "over"
    return None


def prune_warning(
    stage_index: int,
    expected: float,
    target: float,
    *,
    mask_steps: int,
    mask_lr: float,
    lagrangian_lr: float,
    margin: float = OVERSHOOT_MARGIN,
) -> str | None:
    """The one-line warning of a stage that pruned far below or too far above its target
    sparsity (see :func:`target_miss`), or None when the prune is near enough."""
    miss = target_miss(expected, target, margin)
    if miss == "under":
        return (
            f"warning: stage {stage_index} pruned far below its target sparsity: the masks "
            f"had {mask_steps} steps at optim.mask_lr {mask_lr:g} and optim.lagrangian_lr "
            f"{lagrangian_lr:g}; raise these (--set), or prune later (--prune-step, or "
            "prune_by under --prune-step auto)"
        )
    if miss == "over":
        return (
            f"warning: stage {stage_index} pruned above its target sparsity: expected "
            f"{expected:.1%} of target {target:.1%}, more than {margin:.1%} over; the masks "
            "moved past the target: use sparsity_control two_sided (it pulls them back), "
            "--prune-step auto, or a lower optim.mask_lr"
        )
    return None
