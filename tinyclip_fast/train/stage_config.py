"""One stage of progressive distillation (``[[stages]]`` of the run configuration,
train/config.py): how the stage gets its student and, for automatic inheritance, how its masks
learn and when they are pruned (docs/method.md §3b). Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinyclip_fast.inheritance import HF_PREFIX
from tinyclip_fast.pruning.policy import (
    DEFAULT_HOLD_STEPS,
    DEFAULT_SPARSITY_CONTROL,
    DEFAULT_TOLERANCE,
    SPARSITY_CONTROLS,
    PruneTrigger,
)
from tinyclip_fast.train.config_io import setting

LAYER_SELECTIONS = ("every_k", "even")
DEFAULT_SPARSITY_WARMUP = 1000  # the authors' ramp of the sparsity target


@dataclass
class StageConfig:
    """One stage of progressive distillation. Exactly one way to get the stage's student:

    - ``preset`` or ``student_config``: manual inheritance from the teacher (docs/method.md §3a);
    - ``sparsity``: automatic inheritance, masks learned towards the target then pruned
      (docs/method.md §3b);
    - ``from_scratch``: random init with ``preset``/``student_config``'s architecture;
    - none of them: keep training the previous stage's student.
    Later stages start from the previous stage's student, never the teacher; ``init`` instead.
    """

    steps: int = setting(1000, flag=True, help="training steps of the stage")
    preset: str | None = setting(
        None,
        flag=True,
        metavar="NAME",
        help="manual inheritance to a released architecture, e.g. ViT-40M-32-Text-19M, "
        "ViT-61M-32-Text-29M, ViT-8M-16-Text-3M (tinyclip_fast.inheritance.presets.PRESETS)",
    )
    student_config: dict[str, Any] | None = setting(
        None,
        flag=True,
        metavar="FILE",
        help="manual inheritance to an open_clip model config (embed_dim, vision_cfg, "
        "text_cfg); the flag reads it from a JSON file",
    )
    layer_selection: str = setting(
        "every_k",
        choices=LAYER_SELECTIONS,
        help="manual inheritance: teacher layer i*k (the authors') or evenly spread",
    )
    sparsity: float | None = setting(
        None,
        flag=True,
        metavar="S",
        help="automatic inheritance: learn masks until S of the ORIGINAL (teacher-sized) "
        "prunable parameters are gone, then prune (0.25 -> 0.5 -> 0.75 in the authors' recipe)",
    )
    sparsity_warmup: int | None = setting(
        None,
        help="steps over which the sparsity target ramps from 0 to S, at most the steps before "
        f"pruning; null: {DEFAULT_SPARSITY_WARMUP} (the authors'), at most half the steps "
        "before pruning (the masks need time at the target)",
    )
    prune_step: int | str | None = setting(
        None,
        flag=True,
        metavar="K|auto",
        help="automatic inheritance: prune after K steps of the stage; auto: at the first step "
        "after the warm-up where the expected sparsity held within sparsity_tolerance of the "
        "target for prune_hold_steps steps, at prune_by at the latest; null: at its end",
    )
    prune_by: int | None = setting(
        None, help="prune_step auto: the last step it may prune at; null: the stage's steps"
    )
    sparsity_tolerance: float = setting(
        DEFAULT_TOLERANCE,
        help="prune_step auto: how near the target (a fraction of the original's prunable "
        "parameters) the expected sparsity must hold",
    )
    prune_hold_steps: int = setting(
        DEFAULT_HOLD_STEPS, help="prune_step auto: steps in a row the target must hold"
    )
    sparsity_control: str = setting(
        DEFAULT_SPARSITY_CONTROL,
        choices=SPARSITY_CONTROLS,
        help="the Lagrangian: two_sided holds the target from both sides; one_sided (the "
        "authors') only pushes while below it, and the masks may overshoot",
    )
    mask_hidden: bool = setting(
        True,
        help="learn the hidden-width masks too (the authors'; high sparsities need them); false "
        "prunes heads and MLP channels only, the recipe for short mask phases",
    )
    from_scratch: bool = setting(
        False,
        flag=True,
        help="random init with preset/student_config's architecture (a baseline)",
    )
    init: str | None = setting(
        None,
        flag=True,
        metavar="hf:DIR|DIR",
        help=f"start from {HF_PREFIX}DIR (a transformers CLIPModel folder: a released TinyCLIP "
        "model) or a student folder, not the previous stage's student (stage 0: the teacher); "
        "trained on, or what preset/student_config/sparsity inherit from",
    )

    @property
    def kind(self) -> str:
        """``"manual"``, ``"auto"``, ``"scratch"`` or ``"continue"``."""
        if self.from_scratch:
            return "scratch"
        if self.sparsity is not None:
            return "auto"
        if self.preset is not None or self.student_config is not None:
            return "manual"
        return "continue"

    @property
    def mask_steps(self) -> int:
        """The most steps of mask learning before an auto stage prunes."""
        if self.prune_step == "auto":
            return self.steps if self.prune_by is None else self.prune_by
        return self.steps if self.prune_step is None else self.prune_step

    def prune_trigger(self) -> PruneTrigger:
        """When this auto stage prunes (a fixed step is a trigger with ``auto=False``)."""
        return PruneTrigger(
            self.sparsity,
            self.mask_steps,
            auto=self.prune_step == "auto",
            tolerance=self.sparsity_tolerance,
            hold_steps=self.prune_hold_steps,
            warmup_steps=self.target_warmup,
        )

    @property
    def target_warmup(self) -> int:
        """The sparsity target's ramp (``sparsity_warmup``, or its default)."""
        if self.sparsity_warmup is not None:
            return self.sparsity_warmup
        return min(DEFAULT_SPARSITY_WARMUP, max(1, self.mask_steps // 2))

    def validate(self, index: int) -> None:
        where = f"stages[{index}]"
        if self.steps <= 0:
            raise ValueError(f"{where}.steps must be > 0, got {self.steps}")
        if self.sparsity is not None:
            if not 0.0 <= self.sparsity < 1.0:
                raise ValueError(f"{where}.sparsity must be in [0, 1), got {self.sparsity}")
            if self.preset is not None or self.student_config is not None or self.from_scratch:
                raise ValueError(f"{where}: sparsity (auto) excludes preset/student_config/scratch")
            for name in ("prune_step", "prune_by"):
                value = getattr(self, name)
                if isinstance(value, int) and not 0 < value <= self.steps:
                    raise ValueError(f"{where}.{name} must be in (0, {self.steps}], got {value}")
            if isinstance(self.prune_step, str) and self.prune_step != "auto":
                raise ValueError(
                    f"{where}.prune_step must be a step or auto, got {self.prune_step}"
                )
            if self.prune_by is not None and self.prune_step != "auto":
                raise ValueError(f"{where}.prune_by is the bound of prune_step auto: set both")
            if self.sparsity_warmup is not None and self.sparsity_warmup < 0:
                raise ValueError(
                    f"{where}.sparsity_warmup must be >= 0, got {self.sparsity_warmup}"
                )
            try:
                self.prune_trigger()
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
        elif (self.prune_step, self.prune_by, self.sparsity_warmup) != (None, None, None):
            raise ValueError(
                f"{where}: prune_step, prune_by and sparsity_warmup need sparsity (automatic "
                "inheritance)"
            )
        if self.preset is not None and self.student_config is not None:
            raise ValueError(f"{where}: give preset or student_config, not both")
        if self.preset is not None:
            from tinyclip_fast.inheritance.presets import PRESETS

            if self.preset not in PRESETS:
                raise ValueError(
                    f"{where}.preset {self.preset!r} is unknown; presets: {', '.join(PRESETS)}"
                )
        if self.from_scratch and self.preset is None and self.student_config is None:
            raise ValueError(f"{where}: from_scratch needs preset or student_config")
        if self.init is not None and self.from_scratch:
            raise ValueError(f"{where}: from_scratch starts from random weights, not init")
        if self.init is not None and not Path(self.init.removeprefix(HF_PREFIX)).is_dir():
            raise FileNotFoundError(f"{where}.init: no model folder {self.init}")
