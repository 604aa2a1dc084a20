"""The loss's teacher arguments: single values for one teacher, lists for an ensemble."""

import pytest
import torch

from tinyclip_fast.teachers.targets import TeacherLossArgs


def test_targets_are_single_for_one_teacher_and_lists_for_an_ensemble():
    images, texts = [torch.randn(3, 4), torch.randn(3, 6)], [torch.randn(3, 4), torch.randn(3, 6)]
    scales = [torch.tensor(2.0), torch.tensor(3.0)]
    one = TeacherLossArgs(scales[:1], None, torch.device("cpu")).pack(images[:1], texts[:1])
    assert len(one) == 3 and one[0] is images[0] and one[2] is scales[0]
    both = TeacherLossArgs(scales, [-1.0, -2.0], torch.device("cpu")).pack(images, texts)
    assert [len(part) for part in both] == [2, 2, 2, 2]
    assert [float(b) for b in both[3]] == [-1.0, -2.0]
    with pytest.raises(ValueError, match="expected features of 2 teachers, got 1"):
        TeacherLossArgs(scales, None, torch.device("cpu")).pack(images[:1], texts[:1])
