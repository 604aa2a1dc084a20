"""The example run configurations in examples/: each parses with ``load_config``, passes
``validate()`` and sets up the run its comments describe."""

from pathlib import Path

import pytest

from tinyclip_fast.train.config import DistillConfig, load_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytest.importorskip("tomllib", reason="TOML config files need Python >= 3.11")


def check_manual(config: DistillConfig) -> None:
    (stage,) = config.stages
    assert stage.kind == "manual" and stage.preset == "ViT-40M-32-Text-19M"
    assert config.data.kind == "csv" and config.eval.every > 0


def check_progressive(config: DistillConfig) -> None:
    assert [stage.kind for stage in config.stages] == ["auto"] * 3
    assert [stage.sparsity for stage in config.stages] == [0.25, 0.5, 0.75]
    assert [stage.prune_step for stage in config.stages] == [3000, 5000, 8000]
    assert config.loss.fixed_scale == 50.0


def check_ensemble(config: DistillConfig) -> None:
    assert [t.model for t in config.teacher_configs()] == ["ViT-B-32", "ViT-B-16"]
    assert config.loss.family == "softmax"


def check_sigmoid(config: DistillConfig) -> None:
    assert config.loss.family == "sigmoid"
    assert [t.logit_bias for t in config.teacher_configs()] == [-10.0]


def check_reinforced(config: DistillConfig) -> None:
    assert config.data.kind == "reinforced" and config.data.path is not None
    assert config.reinforced.augmentations == 5 and config.reinforced.dtype == "fp16"
    assert config.stages[0].kind == "auto"


CHECKS = {
    "manual.toml": check_manual,
    "progressive.toml": check_progressive,
    "ensemble.toml": check_ensemble,
    "sigmoid.toml": check_sigmoid,
    "reinforced.toml": check_reinforced,
}


def test_every_file_in_examples_is_checked():
    assert sorted(p.name for p in EXAMPLES.iterdir()) == sorted(CHECKS)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_example_parses_and_validates(name):
    config = load_config(EXAMPLES / name)
    config.validate()
    CHECKS[name](config)
    assert config.out_dir == f"runs/{Path(name).stem}"
