"""Argument checks of the affinity loss ops: student features, teacher lists, scales."""

from __future__ import annotations

import math

import torch

from tinyclip_fast.kernels.limits import MAX_TEACHERS
from tinyclip_fast.ops.arguments import (
    as_list,
    check_features,
    check_on_device,
    scalar_argument,
)

KINDS = ("soft_ce", "kl")
# One teacher as the op sees it: its row features, column features and 0-d scale.
Teacher = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def check_scale(name: str, scale: object, device: torch.device) -> torch.Tensor:
    """A finite positive Python number or one-element floating tensor, as a 0-d tensor on
    device. A scale is multiplicative (``exp(logit_scale)``): 0, a negative or a non-finite
    value is a mistake (often the log-space parameter passed as is). A Python number is
    checked on the host, a tensor on its device without a host read (``check_on_device``)."""
    value = scalar_argument(name, scale)
    message = f"{name} must be a finite multiplicative scale > 0 (exp of the log-space logit_scale)"
    if isinstance(value, torch.Tensor):
        detached = value.detach()
        check_on_device(torch.isfinite(detached) & (detached > 0), message)
        return value.reshape(()).to(device)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{message}, got {value}")
    # float64 keeps the scale exact for float64 features; the other paths cast it down.
    return torch.tensor(value, dtype=torch.float64, device=device)


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


def validate(
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
        (t_rows.detach(), t_cols.detach(), check_scale(s_name, s, device).detach())
        for _, t_rows, _, t_cols, s_name, s in checked
    ]
    return rows, cols, teachers


def check_contrastive_weight(weight: object) -> float:
    """``weight`` as a float in [0, 1]; TypeError/ValueError otherwise."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise TypeError(f"contrastive_weight must be a float in [0, 1], got {weight!r}")
    if not 0.0 <= weight <= 1.0:  # NaN fails this too
        raise ValueError(f"contrastive_weight must lie in [0, 1], got {weight}")
    return float(weight)
