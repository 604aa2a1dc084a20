"""Run configuration: settings declared once on the dataclass fields, typed values from files
and --set, paths into lists and free tables, the ranges and choices validate() checks, no
hidden defaults."""

import json

import pytest

from tinyclip_fast.train.config import (
    DataConfig,
    DistillConfig,
    EvalConfig,
    StageConfig,
    apply_override,
    from_dict,
    load_config,
)
from tinyclip_fast.train.config_io import settings


def two_stages() -> DistillConfig:
    return DistillConfig(
        stages=[StageConfig(steps=30, preset="ViT-8M-16-Text-3M"), StageConfig(steps=40)]
    )


def test_set_walks_tables_stage_indices_and_free_tables():
    config = two_stages()
    apply_override(config, "stages.1.steps=5")
    apply_override(config, "stages.0.student_config.embed_dim=64")  # None becomes a table
    apply_override(config, "data.options.csv_separator=,")  # a free table takes any key
    apply_override(config, "optim.betas=[0.9,0.95]")
    apply_override(config, "out_dir=2024")  # string fields keep the text as written
    apply_override(config, "teacher.pretrained=null")
    apply_override(config, 'stages.1={"steps": 7, "sparsity": 0.5}')
    assert config.stages[1] == StageConfig(steps=7, sparsity=0.5)
    assert config.stages[0].student_config == {"embed_dim": 64}
    assert config.data.options == {"csv_separator": ","}
    assert config.optim.betas == (0.9, 0.95) and config.out_dir == "2024"
    assert config.teacher.pretrained is None


@pytest.mark.parametrize(
    "assignment, error, message",
    [
        ("stages.2.steps=5", ValueError, r"stages has 2 entries \(indices 0..1\)"),
        ("optim.lr=abc", TypeError, r"optim.lr must be a number, got 'abc'"),
        ("steps=5", ValueError, r"unknown config key 'steps'.*DistillConfig has"),
        ("optim.lr.x=1", ValueError, "optim.lr is a value, not a table"),
        ("batch_size=1.5", TypeError, "batch_size must be an integer"),
        ("compile=1", TypeError, "compile must be true or false"),
        ("optim.betas=[0.9]", TypeError, "optim.betas must be a list of 2 numbers"),
        ("stages.0=5", TypeError, "stages.0 must be a table"),
        ("loss.distill_weight=1", ValueError, "no longer exists: the loss is .1 - contrastive"),
        ("noequals", ValueError, "must look like key.sub=value"),
    ],
)
def test_set_errors_name_the_key_and_the_type(assignment, error, message):
    with pytest.raises(error, match=message):
        apply_override(two_stages(), assignment)


def test_config_files_are_type_checked(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"optim": {"lr": "abc"}}))
    with pytest.raises(TypeError, match="config.optim.lr must be a number, got 'abc'"):
        load_config(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="unknown key config.stages\\[0\\].stepz"):
        from_dict(DistillConfig, {"stages": [{"stepz": 3}]})
    # Integral floats are integers, integers are floats; the round trip of to_dict holds.
    config = from_dict(DistillConfig, {"batch_size": 64.0, "optim": {"lr": 1}})
    assert config.batch_size == 64 and config.optim.lr == 1.0
    assert from_dict(DistillConfig, json.loads(json.dumps(config.to_dict()))) == config


def test_no_hidden_defaults():
    # Nothing trains unless the run names its student and its data.
    config = DistillConfig()
    with pytest.raises(ValueError, match="no student: give --preset NAME .*ViT-8M-16-Text-3M"):
        config.validate()
    with pytest.raises(ValueError, match="no training data: give --data .*--data synthetic"):
        DataConfig().require()
    assert DataConfig(kind="synthetic").as_dict()["num_samples"] == 10_000
    assert config.precision is None  # resolved per device: fp32 on the CPU, bf16 on CUDA


@pytest.mark.parametrize(
    "assignments, message",
    [
        (["stages.0.steps=0"], r"stages\[0\].steps must be > 0, got 0"),
        (["stages.0.preset=nope"], "preset 'nope' is unknown; presets: ViT-"),
        (
            ['stages.0={"steps": 10, "sparsity": 0.5, "prune_step": 3, "sparsity_warmup": 5}'],
            r"stages\[0\]: the last prune step 3 comes before the sparsity target's warm-up "
            r"\(sparsity_warmup\) ends at step 5",
        ),
        (
            [
                'stages.0={"steps": 60, "sparsity": 0.5, "prune_step": "auto", "prune_by": 10, '
                '"sparsity_warmup": 20}'
            ],
            r"stages\[0\]: the last prune step 10 comes before the sparsity target's warm-up",
        ),
        (['stages.0={"steps": 10, "sparsity": 0.5, "prune_step": "soon"}'], "a step or auto"),
        (['stages.0={"steps": 10, "sparsity": 0.5, "prune_step": 11}'], r"in \(0, 10\]"),
        (
            ['stages.0={"steps": 10, "sparsity": 0.5, "prune_step": 5, "prune_by": 8}'],
            r"stages\[0\].prune_by is the bound of prune_step auto",
        ),
        (
            ['stages.0={"steps": 10, "sparsity": 0.5, "prune_step": "auto", "prune_by": 11}'],
            r"stages\[0\].prune_by must be in \(0, 10\]",
        ),
        (
            [
                'stages.0={"steps": 10, "sparsity": 0.5, "prune_step": "auto", '
                '"sparsity_tolerance": 0}'
            ],
            r"stages\[0\]: sparsity_tolerance must be in \(0, 1\)",
        ),
        (
            [
                'stages.0={"steps": 10, "sparsity": 0.5, "prune_step": "auto", '
                '"prune_hold_steps": 0}'
            ],
            r"stages\[0\]: prune_hold_steps must be >= 1",
        ),
        (["stages.0.prune_by=5"], "prune_step, prune_by and sparsity_warmup need sparsity"),
        (["stages.0.sparsity_control=both"], r"stages\[0\].sparsity_control must be one of"),
        (["loss.contrastive_weight=1.5"], r"contrastive_weight must be in \[0.0, 1.0\]"),
        (["loss.contrastive_weight=NaN"], "contrastive_weight must be in"),
        (["loss.fixed_scale=0"], "fixed_scale must be a finite number > 0"),
        (["optim.mask_lr=-1"], "mask_lr must be a finite number > 0"),
        (["optim.betas=[0.9, 1.0]"], r"betas\[1\] must be in \[0.0, 1.0\)"),
        (["data.size=0"], "data.size must be > 0"),
        (["resume=true", "overwrite=true"], "resume and overwrite exclude each other"),
        (["precision=fp64"], r"precision must be one of \('fp32', 'bf16', 'fp16'\)"),
        (["attention=flash"], "attention must be one of"),
        (["loss.kind=l2"], "loss.kind must be one of"),
        (["loss.family=hinge"], "loss.family must be one of"),
        (["stages.0.layer_selection=odd"], r"stages\[0\].layer_selection must be one of"),
        (["reinforced.dtype=int8"], "reinforced.dtype must be one of"),
        (["reinforced.caption_mode=none"], "reinforced.caption_mode must be one of"),
        (["reinforced.augmentations=0"], "reinforced.augmentations must be > 0, got 0"),
    ],
)
def test_validate_names_the_field(assignments, message):
    config = DistillConfig(stages=[StageConfig(preset="ViT-8M-16-Text-3M")])
    for assignment in assignments:
        apply_override(config, assignment)
    with pytest.raises(ValueError, match=message):
        config.validate()


def test_sparsity_warmup_default_fits_before_pruning():
    # The target ramp fits before pruning: at most half the steps before it.
    assert StageConfig(steps=10, sparsity=0.5, prune_step=3).target_warmup == 1
    assert StageConfig(steps=400, sparsity=0.5, prune_step=300).target_warmup == 150
    assert StageConfig(steps=9000, sparsity=0.5, prune_step=5000).target_warmup == 1000
    assert StageConfig(steps=80, sparsity=0.5).target_warmup == 40  # pruned at the end
    assert StageConfig(steps=9, sparsity=0.5, sparsity_warmup=9).target_warmup == 9
    # Under prune_step auto the bound prune_by (or the stage's end) plays the prune step.
    auto = StageConfig(steps=100, sparsity=0.5, prune_step="auto", prune_by=40)
    assert (auto.mask_steps, auto.target_warmup) == (40, 20)
    assert StageConfig(steps=100, sparsity=0.5, prune_step="auto").mask_steps == 100


def test_every_setting_declares_its_help_and_defaults_live_in_the_dataclass():
    found = settings(DistillConfig)
    assert len({s.path for s in found}) == len(found) > 50
    assert all(s.help for s in found), [s.path for s in found if not s.help]
    defaults = {s.path: s.default for s in found}
    assert defaults["eval.every"] == 1000 and defaults["eval.kind"] is None
    assert defaults["optim.lr"] == DistillConfig().optim.lr
    flags = {s.flag: s.path for s in found if s.flag and not s.path.startswith("teachers.")}
    assert flags["--lr"] == "optim.lr" and flags["--loss"] == "loss.family"
    assert flags["--teacher"] == "teacher.model" and flags["--steps"] == "stages.N.steps"


@pytest.mark.parametrize(
    "values, enabled",
    [
        ({}, False),
        ({"kind": "folder", "path": "val"}, True),
        ({"kind": "folder", "path": "val", "every": 0}, False),
    ],
)
def test_evaluation_is_on_when_an_eval_set_is_named(values, enabled):
    assert EvalConfig(**values).enabled is enabled


@pytest.mark.parametrize(
    "values",
    [{"every": 5}, {"path": "val"}, {"templates": "t.txt"}, {"class_names": "n.txt"}],
    ids=["every", "path", "templates", "class_names"],
)
def test_evaluation_settings_without_an_eval_set_say_no_eval_given(values):
    with pytest.raises(ValueError, match="no --eval given"):
        EvalConfig(**values).require_set()
    EvalConfig(kind="folder", **values).require_set()
    EvalConfig(every=0).require_set()  # off is no evaluation setting
