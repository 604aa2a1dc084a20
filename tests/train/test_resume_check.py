"""What --resume may change: every setting that changes the training is refused by name, the
others are listed in one line, the last stage may grow, the teachers' weights must match."""

import copy

import pytest

from tinyclip_fast.train.config import DistillConfig, StageConfig, TeacherConfig
from tinyclip_fast.train.resume_check import check_resume, flatten


def _config(**changes):
    config = DistillConfig(stages=[StageConfig(steps=4, preset="ViT-8M-16-Text-3M")])
    for path, value in changes.items():
        target = config
        *parents, name = path.split("__")
        for part in parents:
            target = getattr(target, part)
        setattr(target, name, value)
    return config.to_dict()


def _check(current, saved=None, fingerprints=("aa",), saved_fingerprints=("aa",), done=2):
    return check_resume(
        saved or _config(),
        current,
        done_steps=done,
        saved_fingerprints=None if saved_fingerprints is None else list(saved_fingerprints),
        fingerprints=list(fingerprints),
    )


def test_flatten_names_every_leaf_by_its_path():
    assert flatten({"a": {"b": [1, {"c": 2}]}, "d": {}, "e": []}) == {
        "a.b.0": 1,
        "a.b.1.c": 2,
        "d": {},
        "e": [],
    }


def test_an_unchanged_run_resumes_without_a_word():
    assert _check(_config(resume=True)) is None


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"optim__lr": 1e-3}, "optim.lr 0.0001 there, 0.001 now"),
        ({"loss__family": "sigmoid"}, 'loss.family "softmax" there, "sigmoid" now'),
        ({"loss__contrastive_weight": 0.5}, "loss.contrastive_weight 0.0 there, 0.5 now"),
        ({"data__path": "other.tsv"}, 'data.path null there, "other.tsv" now'),
        ({"teacher__model": "ViT-B-16"}, 'teacher.model "ViT-B-32" there, "ViT-B-16" now'),
        ({"batch_size": 128}, "batch_size 256 there, 128 now"),
        ({"seed": 1}, "seed 0 there, 1 now"),
        ({"precision": "bf16"}, 'precision null there, "bf16" now'),
    ],
    ids=["lr", "loss-family", "loss-weight", "data", "teacher", "batch", "seed", "precision"],
)
def test_a_change_to_the_training_is_refused_by_name(changes, named):
    with pytest.raises(ValueError, match="cannot resume") as caught:
        _check(_config(**changes))
    assert named in str(caught.value)


def test_every_difference_is_named_in_one_refusal():
    with pytest.raises(ValueError) as caught:
        _check(_config(optim__lr=1e-3, seed=3), fingerprints=("bb",))
    message = str(caught.value)
    assert "optim.lr" in message and "seed 0 there, 3 now" in message
    assert "the weights of teacher 0 (fingerprint aa there, bb now)" in message


def test_more_stages_or_another_student_are_refused():
    more = _config()
    more["stages"].append(copy.deepcopy(more["stages"][0]))
    with pytest.raises(ValueError, match=r"stages\.1\.steps absent there, 4 now"):
        _check(more)
    with pytest.raises(ValueError, match=r'stages\.0\.preset "ViT-8M-16-Text-3M" there, null'):
        _check(_config(stages=[StageConfig(steps=4, student_config={"embed_dim": 8})]))


def test_cadence_workers_and_device_may_change_and_are_said_in_one_line():
    current = _config(log_every=5, num_workers=2, device="cpu", threads=1, save_every=7)
    current["eval"]["every"] = 10
    line = _check(current)
    assert line.startswith("resuming with changed settings: ")
    for change in ("log_every 10 -> 5", "num_workers null -> 2", 'device null -> "cpu"'):
        assert change in line
    assert "eval.every 1000 -> 10" in line and "threads null -> 1" in line


def test_the_last_stage_may_grow_but_not_shrink_below_its_progress():
    longer = _config(stages=[StageConfig(steps=9, preset="ViT-8M-16-Text-3M")])
    assert _check(longer) is None  # the stage says so itself when it starts
    shorter = _config(stages=[StageConfig(steps=1, preset="ViT-8M-16-Text-3M")])
    with pytest.raises(ValueError, match="the last stage is at its step 2, past the 1 steps"):
        _check(shorter)


def test_moved_teacher_files_with_the_same_weights_may_resume():
    moved = _config(teacher__pretrained="/new/place/teacher.pt")
    assert 'teacher.pretrained null -> "/new/place/teacher.pt"' in _check(moved)
    # A checkpoint without fingerprints cannot tell: the file name must stay.
    with pytest.raises(ValueError, match="teacher.pretrained null there"):
        _check(moved, saved_fingerprints=None)


def test_an_ensemble_of_other_size_is_refused():
    ensemble = _config(teachers=[TeacherConfig(model="a"), TeacherConfig(model="b")])
    with pytest.raises(ValueError, match="2 teachers there, 1 now") as caught:
        _check(_config(), saved=ensemble, saved_fingerprints=("aa", "bb"))
    assert 'teachers.0.model "a" there, absent now' in str(caught.value)
