"""tinyclip-distill: options, config precedence, an end-to-end run from files, clear errors."""

import json
import subprocess
import sys

import open_clip
import pytest
import torch
from PIL import Image

from tinyclip_fast.cli import build_parser, config_from_args, main
from tinyclip_fast.inheritance.student_io import load_student
from tinyclip_fast.ops.backend import force_backend
from tinyclip_fast.train.checkpoint import CHECKPOINT_NAME
from tinyclip_fast.train.config import load_config

# open_clip's own tokenizer (vocabulary 49,408), so CSV captions and eval prompts tokenize.
TEACHER_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
STUDENT_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1},
}


@pytest.fixture
def files(tmp_path):
    """A teacher config + checkpoint, a student config, a CSV of images, a class folder."""
    teacher_json = tmp_path / "cli-tiny-teacher.json"
    teacher_json.write_text(json.dumps(TEACHER_CFG))
    torch.manual_seed(3)
    weights = tmp_path / "teacher.pt"
    torch.save(open_clip.model.CLIP(**TEACHER_CFG).state_dict(), weights)
    student_json = tmp_path / "student.json"
    student_json.write_text(json.dumps(STUDENT_CFG))
    rows = ["filepath\ttitle"]
    for colour in ("red", "blue"):
        (tmp_path / "classes" / colour).mkdir(parents=True)
        for i in range(4):
            pixels = (torch.rand(20, 20, 3) * 255).byte().numpy()
            pixels[..., 0 if colour == "red" else 2] = 255
            image = Image.fromarray(pixels)
            image.save(tmp_path / "classes" / colour / f"{i}.png")
            rows.append(f"classes/{colour}/{i}.png\ta photo of something {colour}")
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    return tmp_path


def base_args(files, *extra):
    return [
        "--teacher", str(files / "cli-tiny-teacher.json"),
        "--pretrained", str(files / "teacher.pt"),
        "--student-config", str(files / "student.json"),
        "--data", f"csv:{files / 'train.tsv'}",
        "--batch-size", "4", "--steps", "4", "--warmup-steps", "1", "--lr", "1e-3",
        "--precision", "fp32", "--device", "cpu", "--no-progress", "--log-every", "1",
        "--out-dir", str(files / "run"),
        *extra,
    ]  # fmt: skip


def run_main(argv):
    with force_backend("torch"):
        return main(argv)


def test_help_explains_every_option(capsys):
    parser = build_parser()
    for action in parser._actions:
        assert action.help, f"option {action.option_strings} has no help text"
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for needle in ("--sparsity", "--teacher-cache", "--micro-batch-size", "examples:", "torchrun"):
        assert needle in text


def test_config_file_flags_and_set_precedence(tmp_path, capsys):
    values = {
        "batch_size": 32,
        "optim": {"lr": 0.5, "betas": [0.9, 0.95]},
        "stages": [
            {"steps": 30, "preset": "ViT-61M-32-Text-29M"},
            {"steps": 40, "sparsity": 0.5, "prune_step": 30},
        ],
    }
    (tmp_path / "run.json").write_text(json.dumps(values))
    (tmp_path / "run.toml").write_text(
        "batch_size = 32\n[optim]\nlr = 0.5\nbetas = [0.9, 0.95]\n"
        '[[stages]]\nsteps = 30\npreset = "ViT-61M-32-Text-29M"\n'
        "[[stages]]\nsteps = 40\nsparsity = 0.5\nprune_step = 30\n"
    )
    assert load_config(tmp_path / "run.json") == load_config(tmp_path / "run.toml")
    parser = build_parser()
    args = parser.parse_args(
        ["--config", str(tmp_path / "run.toml"), "--lr", "0.1", "--batch-size", "64"]
        + ["--set", "optim.lr=0.2", "--set", "stages.1.prune_step=35", "--data", "synthetic"]
        + ["--data-size", "100"]
    )
    config = config_from_args(args)
    assert config.optim.lr == 0.2  # --set beats the flag, which beats the file
    assert config.batch_size == 64 and config.optim.betas == (0.9, 0.95)
    assert [s.prune_step for s in config.stages] == [None, 35]
    assert config.stages[1].kind == "auto" and config.data.kind == "synthetic"

    # --print-config writes a file that --config reads back to the same configuration.
    assert main(["--config", str(tmp_path / "run.toml"), "--print-config"]) == 0
    (tmp_path / "printed.json").write_text(capsys.readouterr().out)
    assert load_config(tmp_path / "printed.json") == load_config(tmp_path / "run.toml")


def test_end_to_end_from_files_then_resume_finished_run(files):
    extra = ["--eval", f"folder:{files / 'classes'}", "--eval-every", "2", "--save-every", "2"]
    assert run_main(base_args(files, *extra)) == 0
    records = [json.loads(line) for line in (files / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "top1" in r] == [2, 4]
    student = load_student(files / "run" / "student")
    assert student.visual.transformer.width == 32
    # open_clip loads the exported (uniform) student by itself.
    plain = open_clip.create_model(f"local-dir:{files / 'run' / 'student'}")
    assert sum(p.numel() for p in plain.parameters()) == sum(
        p.numel() for p in student.parameters()
    )
    # Resuming a finished run trains nothing more and succeeds.
    assert run_main(base_args(files, *extra, "--resume")) == 0
    assert len((files / "run" / "metrics.jsonl").read_text().splitlines()) == len(records)


def test_bad_inputs_exit_with_clear_messages(files, capsys):
    def error_of(argv, code=2):
        try:
            assert run_main(argv) == code
        except SystemExit as exit_info:  # argparse errors
            assert exit_info.code == code
        return capsys.readouterr().err

    missing = str(files / "nope.pt")
    assert "teacher checkpoint" in error_of(base_args(files, "--pretrained", missing))
    assert "config file not found" in error_of(["--config", str(files / "nope.toml")])
    assert "unknown config key" in error_of(base_args(files, "--set", "optim.lrr=1"))
    assert "does not exist" in error_of(base_args(files, "--data", f"csv:{files / 'x.tsv'}"))
    assert "does not exist" in error_of(base_args(files, "--student-config", missing))
    assert "sparsity must be in" in error_of(base_args(files, "--sparsity", "2"))
    assert "stages is empty" in error_of(base_args(files, "--set", "stages=[]"))
    (files / "run").mkdir()
    (files / "run" / CHECKPOINT_NAME).write_bytes(b"truncated")
    assert "corrupt training checkpoint" in error_of(base_args(files, "--resume"))


def test_python_dash_m_entry_points():
    for argv in (["--help"], ["demo", "--help"]):
        done = subprocess.run(
            [sys.executable, "-m", "tinyclip_fast", *argv], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        assert "usage:" in done.stdout


def test_build_teacher_cache_then_distill_from_it(files, capsys):
    cache = str(files / "teacher_cache.safetensors")
    assert run_main(base_args(files, "--teacher-cache", cache, "--build-teacher-cache")) == 0
    assert "wrote 8 teacher embeddings" in capsys.readouterr().out
    assert run_main(base_args(files, "--teacher-cache", cache)) == 0
    records = [json.loads(line) for line in (files / "run" / "metrics.jsonl").open()]
    assert len(records) == 4 and all(r["loss"] > 0 for r in records)
