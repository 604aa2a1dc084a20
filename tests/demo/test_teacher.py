"""The demo's teacher and student architectures."""

import open_clip

from tinyclip_fast.demo import teacher as demo_teacher
from tinyclip_fast.demo.run import MAX_STUDENT_FRACTION


def test_student_fits_the_budget():
    teacher = demo_teacher.teacher_config(30, 12)
    student = demo_teacher.student_config(30, 12)
    count = lambda cfg: sum(p.numel() for p in open_clip.model.CLIP(**cfg).parameters())
    assert count(student) <= MAX_STUDENT_FRACTION * count(teacher)
