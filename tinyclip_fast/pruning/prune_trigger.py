"""When an automatic-inheritance stage prunes its masks (docs/method.md §3b).

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

# Within this much of the target (a fraction of the original's prunable parameters) the
# expected sparsity counts as held.
DEFAULT_TOLERANCE = 0.02
# Steps in a row the expected sparsity must hold within the tolerance before "auto" prunes.
DEFAULT_HOLD_STEPS = 5


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
        if auto:
            if not 0 < tolerance < 1:
                raise ValueError(f"the sparsity tolerance must be in (0, 1), got {tolerance}")
            if hold_steps < 1:
                raise ValueError(f"the prune hold steps must be >= 1, got {hold_steps}")
            if last_step < warmup_steps:
                raise ValueError(
                    f"the last prune step {last_step} comes before the sparsity target's "
                    f"warm-up ends (step {warmup_steps}): the target could never be held"
                )
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
