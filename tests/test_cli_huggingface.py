"""tinyclip-distill with Hugging Face CLIPModel folders and retrieval evaluation, in-process:
a transformers teacher (--teacher hf:DIR), a stage started from a saved model (--init), the
student-hf/ export (export_hf) and its one-line refusal for per-layer widths, and
--eval retrieval:FILE recalls in metrics.jsonl. No network: every model is built here."""

import json
import sys

import open_clip
import pytest
import torch
from PIL import Image
from support import binary_masks, write_hf_clip

from tinyclip_fast.cli import main
from tinyclip_fast.inheritance.student_io import load_student, save_student
from tinyclip_fast.ops.backend import force_backend
from tinyclip_fast.pruning.masked_clip import MaskedCLIP

pytest.importorskip("transformers")
from tinyclip_fast.inheritance.hf import load_hf_clip  # noqa: E402

STUDENT_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 2},
}
RECALLS = [f"{way}_retrieval_recall@{k}" for way in ("image", "text") for k in (1, 5, 10)]


@pytest.fixture
def files(tmp_path):
    """A transformers teacher folder, a student config, images with captions in train.csv
    and pairs.csv (two captions for the first image)."""
    write_hf_clip(tmp_path / "teacher-hf")
    (tmp_path / "student.json").write_text(json.dumps(STUDENT_CFG))
    rows = []
    for i, colour in enumerate(("red", "green", "blue", "red", "blue", "green")):
        pixels = (torch.rand(20, 20, 3) * 255).byte().numpy()
        pixels[..., i % 3] = 255
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,a photo of something {colour}")
    (tmp_path / "train.csv").write_text("filepath,title\n" + "\n".join(rows) + "\n")
    pairs = ["0.png,a bright red square", *rows[:4]]
    (tmp_path / "pairs.csv").write_text("filepath,title\n" + "\n".join(pairs) + "\n")
    return tmp_path


def run_main(files, *extra):
    args = [
        "--teacher", f"hf:{files / 'teacher-hf'}", "--data", f"csv:{files / 'train.csv'}",
        "--batch-size", "2", "--steps", "2", "--set", "optim.warmup_steps=1", "--lr", "1e-3",
        "--device", "cpu", "--set", "progress=false", "--out-dir", str(files / "run"), *extra,
    ]  # fmt: skip
    with force_backend("torch"):
        return main([str(arg) for arg in args])


def error_line(stderr):
    lines = [line for line in stderr.splitlines() if line.startswith("tinyclip-distill:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@torch.no_grad()
def embeddings(model):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = open_clip.tokenizer.SimpleTokenizer(context_length=16)(["a cat", "two dogs"])
    model = model.eval()
    return model.encode_image(images), model.encode_text(tokens)


@pytest.mark.slow
def test_hf_teacher_retrieval_eval_and_hf_export(files, capsys):
    extra = [
        "--student-config",
        files / "student.json",
        "--eval",
        f"retrieval:{files / 'pairs.csv'}",
    ]
    assert run_main(files, *extra, "--set", "eval.every=1", "--set", "export_hf=true") == 0
    out = capsys.readouterr().out
    records = [json.loads(line) for line in (files / "run" / "metrics.jsonl").open()]
    evaluations = [r for r in records if "image_retrieval_recall@1" in r]
    assert [r["step"] for r in evaluations] == [1, 2]
    for record in evaluations:
        assert sorted(record) == sorted(["step", "stage", *RECALLS])
        assert all(0.0 <= record[name] <= 1.0 for name in RECALLS)
    # Recall@5 of 4 images: every image hit; 5 captions, 4 images: every caption hit at 5.
    assert evaluations[-1]["text_retrieval_recall@5"] == 1.0
    assert "step 2 stage 0: image_retrieval_recall@1 " in out
    assert f"student as a transformers CLIPModel in {files / 'run' / 'student-hf'}" in out
    native = embeddings(load_student(files / "run" / "student"))
    exported = embeddings(load_hf_clip(files / "run" / "student-hf"))
    for a, b in zip(exported, native, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def _pruned_student(folder):
    """A student folder whose layers have different head counts and MLP widths."""
    with torch.random.fork_rng():
        torch.manual_seed(2)
        masked = MaskedCLIP(open_clip.model.CLIP(**STUDENT_CFG))
    binary_masks(masked)
    return save_student(masked.prune(), folder)


@pytest.mark.slow
def test_init_from_a_pruned_student_trains_it_and_the_hf_export_is_refused(files, capsys):
    init = _pruned_student(files / "pruned")
    assert run_main(files, "--init", init, "--set", "export_hf=true") == 0
    out = capsys.readouterr().out
    assert (
        "no student-hf/ export: cannot export to Hugging Face CLIPModel: per-layer head counts "
        "or MLP widths (automatic inheritance) cannot be expressed" in out
    )
    assert not (files / "run" / "student-hf").exists()
    trained, start = load_student(files / "run" / "student"), load_student(init)
    assert trained.state_dict().keys() == start.state_dict().keys()
    assert all(
        a.shape == b.shape for a, b in zip(trained.parameters(), start.parameters(), strict=True)
    )
    assert not torch.equal(trained.visual.conv1.weight, start.visual.conv1.weight)


@pytest.mark.slow
def test_init_from_a_hf_folder_starts_from_its_weights(files):
    folder, model = write_hf_clip(files / "student-in", STUDENT_CFG, seed=5)
    assert run_main(files, "--init", f"hf:{folder}", "--lr", "1e-12") == 0
    for a, b in zip(
        embeddings(load_student(files / "run" / "student")), embeddings(model), strict=True
    ):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "extra, message",
    [
        pytest.param(
            ["--init", "hf:{files}/nope"], "stages[0].init: no model folder", id="missing"
        ),
        pytest.param(
            ["--init", "hf:{files}/wide"],
            "init hf:{files}/wide has image_size 64, the teacher 32",
            id="inputs",
        ),
        pytest.param(
            [
                "--init",
                "{files}/pruned",
                "--from-scratch",
                "--student-config",
                "{files}/student.json",
            ],
            "from_scratch starts from random weights, not init",
            id="scratch",
        ),
    ],
)
def test_init_mistakes_are_one_line(files, capsys, extra, message):
    wide = {**STUDENT_CFG, "vision_cfg": {**STUDENT_CFG["vision_cfg"], "image_size": 64}}
    write_hf_clip(files / "wide", wide)
    _pruned_student(files / "pruned")
    assert run_main(files, *(str(a).format(files=files) for a in extra)) == 2
    assert message.format(files=files) in error_line(capsys.readouterr().err)


def test_export_hf_without_transformers_names_the_extra(files, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "tinyclip_fast.inheritance.hf")
    extra = ["--student-config", files / "student.json", "--set", "export_hf=true"]
    assert run_main(files, *extra) == 2
    assert "pip install 'tinyclip-fast[hf]'" in error_line(capsys.readouterr().err)
    assert not (files / "run").exists()
