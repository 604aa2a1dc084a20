"""tinyclip-distill: options generated from the settings, config precedence, runs from files,
and mistakes a user makes through the console script in subprocesses (what a user types), each
failure one clear line.

Subprocesses run without TRITON_INTERPRET (CPU tensors take the PyTorch paths, as for a user)
and on one thread each; independent ones run two at a time.
"""

import json
import os
import resource
import signal
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from support import write_datacompdr_shards, write_image_shards

from tinyclip_fast.cli import _done_line, build_parser, main
from tinyclip_fast.cli_config import config_from_args
from tinyclip_fast.data.reinforced import read_header
from tinyclip_fast.inheritance.student_io import load_student
from tinyclip_fast.ops.backend import force_backend
from tinyclip_fast.train.checkpoint import load_training_state
from tinyclip_fast.train.config import DistillConfig, load_config
from tinyclip_fast.train.config_io import settings, settings_markdown, show
from tinyclip_fast.train.run_folder import CHECKPOINT_NAME

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
# The installed console script (python -m tinyclip_fast where it is not installed).
SCRIPT = Path(sys.executable).with_name("tinyclip-distill")
COMMAND = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "tinyclip_fast"]


@pytest.fixture
def files(tmp_path):
    """A teacher config + checkpoint, a student config, images in class folders listed in
    train.tsv (tab) and train.csv (comma)."""
    teacher_json = tmp_path / "cli-tiny-teacher.json"
    teacher_json.write_text(json.dumps(TEACHER_CFG))
    torch.manual_seed(3)
    weights = tmp_path / "teacher.pt"
    torch.save(open_clip.model.CLIP(**TEACHER_CFG).state_dict(), weights)
    student_json = tmp_path / "student.json"
    student_json.write_text(json.dumps(STUDENT_CFG))
    rows = []
    for colour in ("red", "blue"):
        (tmp_path / "classes" / colour).mkdir(parents=True)
        for i in range(4):
            pixels = (torch.rand(20, 20, 3) * 255).byte().numpy()
            pixels[..., 0 if colour == "red" else 2] = 255
            Image.fromarray(pixels).save(tmp_path / "classes" / colour / f"{i}.png")
            rows.append((f"classes/{colour}/{i}.png", f"a photo of something {colour}"))
    for name, sep in (("train.tsv", "\t"), ("train.csv", ",")):
        lines = [f"filepath{sep}title", *(sep.join(row) for row in rows)]
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    return tmp_path


def base_args(files, *extra, student=True, data=True):
    args = [
        "--teacher", str(files / "cli-tiny-teacher.json"),
        "--pretrained", str(files / "teacher.pt"),
        "--batch-size", "4", "--steps", "4", "--set", "optim.warmup_steps=1", "--lr", "1e-3",
        "--device", "cpu", "--set", "progress=false", "--set", "log_every=1",
        "--out-dir", str(files / "run"),
    ]  # fmt: skip
    if student:
        args += ["--student-config", str(files / "student.json")]
    if data:
        args += ["--data", f"csv:{files / 'train.tsv'}"]
    return [*args, *extra]


def run_main(argv):
    with force_backend("torch"):
        return main([str(arg) for arg in argv])


def cli(*args, env=None, umask=None, **kwargs):
    """The console script in a subprocess: (exit status, stdout, stderr)."""
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment.update(OMP_NUM_THREADS="1", **(env or {}))
    done = subprocess.run(
        [*COMMAND, *map(str, args)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
        preexec_fn=None if umask is None else (lambda: os.umask(umask)),
        **kwargs,
    )
    return done.returncode, done.stdout, done.stderr


def cli_parallel(*argvs):
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda argv: cli(*argv), argvs))


def one_error(stderr, label="error"):
    """The single 'tinyclip-distill: error: ...' line of a failed run (no traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("tinyclip-distill:")]
    assert len(lines) == 1 and lines[0].startswith(f"tinyclip-distill: {label}: "), stderr
    return lines[0]


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").open()]


TWO_STAGES = '[[stages]]\nsteps = 3\npreset = "ViT-8M-16-Text-3M"\n[[stages]]\nsteps = 3\n'


@pytest.mark.slow
@pytest.mark.parametrize(
    "message, argv",
    [
        pytest.param(
            "stages[0].steps must be > 0, got 0", ["--steps", "0"], id="zero-steps-not-1000"
        ),
        pytest.param(
            "no training data: give --data csv:FILE", ["--data", None], id="no-data-not-noise"
        ),
        pytest.param(
            "no student: give --preset NAME (manual inheritance; ViT-61M-32-Text-29M",
            ["--student-config", None],
            id="no-hidden-default-student",
        ),
        pytest.param(
            "--set stages.2.steps=5: stages has 2 entries (indices 0..1)",
            ["--config", "two.toml", "--set", "stages.2.steps=5", "--steps", None]
            + ["--student-config", None],
            id="stage-index-out-of-range",
        ),
        pytest.param(
            "--set optim.lr=abc: optim.lr must be a number, got 'abc'",
            ["--set", "optim.lr=abc"],
            id="set-value-of-wrong-type",
        ),
        pytest.param(
            "--lr abc: optim.lr must be a number, got 'abc'",
            ["--lr", "abc"],
            id="flag-value-of-wrong-type",
        ),
        pytest.param(
            "--data /data/train.tsv: name the kind first, e.g. --data csv:/data/train.tsv",
            ["--data", "/data/train.tsv"],
            id="data-without-kind",
        ),
        pytest.param(
            "--eval /data/val: name the kind first, e.g. --eval folder:/data/val",
            ["--eval", "/data/val"],
            id="eval-without-kind",
        ),
        pytest.param(
            "eval.every=1 sets up an evaluation, but no --eval given",
            ["--set", "eval.every=1"],
            id="eval-every-without-eval",
        ),
        pytest.param(
            "--build-teacher-cache writes the per-sample embedding cache named by "
            "--teacher-cache FILE, and none is given; the reinforced cache of --data is "
            "--build-reinforced-cache",
            ["--build-teacher-cache"],
            id="embedding-cache-build-without-a-path",
        ),
        pytest.param(
            "unknown option 'shufle' for data kind 'csv'; its options: img_key, caption_key",
            ["--set", "data.options.shufle=true"],
            id="misspelt-data-option",
        ),
        pytest.param(
            "--preset ViT-8M-16-Text-3M cannot hold beside stages[0].student_config = ",
            ["--config", "student.toml", "--preset", "ViT-8M-16-Text-3M", "--student-config", None],
            id="flag-conflicting-with-the-file-stage",
        ),
    ],
)
def test_config_mistakes_are_one_line_before_torch_loads(files, message, argv):
    (files / "two.toml").write_text(TWO_STAGES)
    (files / "student.toml").write_text('[[stages]]\nstudent_config = {"embed_dim" = 8}\n')
    # A None value removes that option from base_args; .toml names are in the files folder.
    drop = {flag for flag, value in zip(argv, argv[1:], strict=False) if value is None}
    extra = [arg for arg in argv if arg is not None and arg not in drop]
    extra = [files / arg if arg.endswith(".toml") else arg for arg in extra]
    args = base_args(files)
    for flag in drop:
        del args[args.index(flag) : args.index(flag) + 2]
    status, out, err = cli(*args, *extra)
    assert status == 2 and message in one_error(err), (message, err)


@pytest.mark.slow
def test_other_ranks_leave_configuration_errors_to_rank_zero(files):
    # Torchrun's other ranks read the same configuration: rank 0 alone reports it.
    status, out, err = cli(*base_args(files, "--steps", "0"), env={"RANK": "1"})
    assert status == 2 and out == err == ""


@pytest.mark.slow
def test_print_config_keeps_free_data_options_and_survives_a_closed_pipe(files):
    # data.options is a free table, set with --set under open_clip's names.
    status, out, err = cli(
        *base_args(files, "--set", "data.options.csv_caption_key=caption"),
        "--set",
        "data.options.csv_separator=;",
        "--print-config",
    )
    assert status == 0, err
    assert json.loads(out)["data"]["options"] == {
        "csv_caption_key": "caption",
        "csv_separator": ";",
    }
    # `--print-config | head`: a reader that stops early is no BrokenPipeError traceback.
    reader_gone = subprocess.Popen(
        [*COMMAND, *map(str, base_args(files)), "--print-config"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    reader_gone.stdout.close()
    assert reader_gone.wait(timeout=60) == 0
    assert reader_gone.stderr.read() == b""
    status, out, _ = cli("--version")
    assert status == 0 and out.startswith("tinyclip-distill 0.1.0 (torch ")


@pytest.fixture(scope="module")
def help_text():
    return build_parser().format_help()


@pytest.mark.parametrize(
    "needle",
    [
        "data.options (default: {})", "csv_separator (default from the", "csv_img_key",
        "csv_caption_key", ".csv comma, else tab", "(default: 0.0001)", "(default: 2000)",
        "(default: 0.02)", "optim.mask_lr", "optim.lagrangian_lr", "data.skip_bad_samples",
        "--overwrite", "--version", "fp32 on the CPU", "--teacher-cache", "--micro-batch-size",
        "examples:", "torchrun", "reinforced.cache_dir", "reinforced.augmentations (default: 5)",
        "reinforced:PATH", "datacompdr:'shards/{00000..01000}.tar'",
        "reinforced.dtype (default: fp16) {fp16,bf16,fp32}", "--loss {softmax,sigmoid}",
        "(default: softmax)", "teacher.logit_bias", "reads the FIRST teacher",
        "--build-teacher-cache", "--build-reinforced-cache", "eval.every (default: 1000)",
        "docs/cli.md",
    ],
)  # fmt: skip
def test_help_shows_defaults_and_every_option(help_text, needle):
    assert needle in " ".join(help_text.split()), needle


def test_every_option_and_setting_has_help(help_text):
    for action in build_parser()._actions:
        assert action.help, f"option {action.option_strings} has no help text"
    for entry in settings(DistillConfig):
        assert entry.help, f"setting {entry.path} has no help text"
        assert f"\n  {entry.path} (default: {show(entry.default)})" in help_text, entry.path


def test_help_examples_keep_their_line_breaks(help_text):
    examples = help_text[help_text.index("examples:") :].splitlines()
    assert "--pretrained ./vit_b32_laion2b_e16.pt \\" in examples[2]
    for line, following in zip(examples, examples[1:], strict=False):
        assert len(line) <= 100 and "   " not in line.strip(), line
        if line.endswith("\\"):
            assert following.startswith("      "), following


@pytest.mark.slow
def test_the_command_line_modules_import_no_torch():
    code = "import sys, tinyclip_fast.cli; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_docs_list_every_setting_with_its_default():
    text = (Path(__file__).parents[1] / "docs" / "cli.md").read_text()
    table = settings_markdown(DistillConfig)
    assert table in text, (
        "docs/cli.md's settings table is stale: paste the output of python -c 'from "
        "tinyclip_fast.train.config import DistillConfig; from tinyclip_fast.train.config_io "
        "import settings_markdown; print(settings_markdown(DistillConfig))'"
    )


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"]], ids=["distill", "demo"])
def test_help_runs_through_the_module(argv):
    done = subprocess.run(
        [sys.executable, "-m", "tinyclip_fast", *argv], capture_output=True, text=True
    )
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr


@pytest.mark.slow
def test_run_folder_rules_extension_and_pruning_report(files):
    # An auto stage (prune at step 3 of 4) on the comma-separated train.csv, eval every 2 steps.
    args = base_args(files, "--data", f"csv:{files / 'train.csv'}", student=False)
    args += ["--sparsity", "0.5", "--prune-step", "3", "--set", "save_every=2"]
    args += ["--eval", f"folder:{files / 'classes'}", "--set", "eval.every=2"]
    run = files / "run"
    status, out, err = cli(*args, umask=0o027)
    assert status == 0, err
    # fp32 on the CPU unless asked; train.csv read with commas.
    assert "distilling on cpu in fp32" in out and out.count("done: student") == 1
    # The end line names the loader that builds this student (open_clip: uniform widths).
    student = run / "student"
    uniform = json.loads((student / "open_clip_config.json").read_text())["open_clip_compatible"]
    loader = (
        "open_clip.create_model('local-dir:{}')" if uniform else "tinyclip_fast.load_student('{}')"
    )
    assert f"{loader.format(student)} loads it" in out
    # The prune is reported, far below the target is a warning, the re-warm-up of
    # the rate (200 steps) is clipped to the stage (1 step) instead of holding it near 0.
    assert "stage 0: pruned at step 3: expected sparsity " in out and "of target 50.0%" in out
    assert "warning: stage 0 pruned far below its target sparsity" in out
    records = metrics(run)
    pruned = [r for r in records if r.get("event") == "pruned"]
    assert len(pruned) == 1 and pruned[0]["params_after"] < pruned[0]["params_before"]
    lr = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert lr[4] == pytest.approx(0.25e-3)  # the cosine at step 3 of 4, not 1/200 of it
    # Checkpoint and student follow the umask (0027: 0640), as metrics.jsonl does.
    written = [run / CHECKPOINT_NAME, run / "metrics.jsonl", *(run / "student").iterdir()]
    assert {stat.S_IMODE(path.stat().st_mode) for path in written} == {0o640}

    # A second run into the folder is refused; the first run's files stay as they were.
    checkpoint, log = (run / CHECKPOINT_NAME).read_bytes(), (run / "metrics.jsonl").read_text()
    status, out, err = cli(*args)
    line = one_error(err)
    assert status == 2 and "holds another run" in line
    assert "--resume" in line and "--overwrite" in line
    assert (run / CHECKPOINT_NAME).read_bytes() == checkpoint
    assert (run / "metrics.jsonl").read_text() == log

    # Extending the finished run: two more steps on the pruned student.
    status, out, err = cli(*args, "--resume", "--steps", "6")
    assert status == 0, err
    assert "extending stage 0 from 4 to 6 steps" in out
    assert [r["step"] for r in metrics(run) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert load_training_state(run / CHECKPOINT_NAME)["step"] == 6

    status, out, err = cli(*args, "--overwrite")
    assert status == 0, err
    assert [r["step"] for r in metrics(run) if "loss" in r] == [1, 2, 3, 4]


def wait_for(condition, what, seconds=120):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_held_run_folder_refuses_other_runs_naming_the_holder(files):
    # Run A trains (bf16 on the CPU: a warning); B, B --overwrite and B --resume into its
    # folder are refused naming A; Ctrl-C then stops A at a step, and the lock goes with it.
    run = files / "run"
    args = base_args(files, "--steps", "100000", "--precision", "bf16", "--threads", "1")
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out_file, err_file = files / "a.out", files / "a.err"
    with out_file.open("w") as out, err_file.open("w") as err:
        holder = subprocess.Popen(
            [*COMMAND, *map(str, args)], stdout=out, stderr=err, env=environment
        )
    try:
        wait_for(lambda: "distilling on cpu" in out_file.read_text() or holder.poll(), "run A")
        assert holder.poll() is None, err_file.read_text()
        for extra in ([], ["--overwrite"], ["--resume"]):
            status, _, err = cli(*args, *extra)
            line = one_error(err)
            assert status == 2 and f"{run} is in use by another run (pid {holder.pid} on " in line
            assert "--out-dir" in line
        holder.send_signal(signal.SIGINT)
        assert holder.wait(timeout=120) == 130
    finally:
        holder.kill()
    said = out_file.read_text()
    assert "warning: bf16 autocast on the CPU is usually several times slower than fp32" in said
    assert "stopped by signal at step" in said and not (run / "run.lock").exists()
    assert "run again with --resume" in one_error(err_file.read_text(), "interrupted")


@pytest.mark.slow
def test_resume_refuses_what_changes_the_training_and_names_what_may_change(files):
    run = files / "run"
    args = base_args(files, "--steps", "2", "--eval", f"folder:{files / 'classes'}")
    status, out, err = cli(*args, "--set", "eval.every=1")
    assert status == 0, err
    # The run folder: the resolved configuration, a plot, and how to load the student.
    config = load_config(run / "config.json")
    assert config.eval.every == 1 and config.stages[0].steps == 2
    assert (run / "progress.png").read_bytes()[:4] == b"\x89PNG"
    assert f"open_clip.create_model('local-dir:{run / 'student'}') loads it" in out
    # Other teacher weights, loss family, learning rate and data: each named, nothing run.
    torch.manual_seed(4)
    torch.save(open_clip.model.CLIP(**TEACHER_CFG).state_dict(), files / "other.pt")
    changed = [*args, "--resume", "--pretrained", files / "other.pt", "--loss", "sigmoid"]
    changed += ["--lr", "2e-3", "--data", f"csv:{files / 'train.csv'}"]
    checkpoint = (run / CHECKPOINT_NAME).read_bytes()
    status, _, err = cli(*changed)
    line = one_error(err)
    assert status == 2 and line.count("cannot resume") == 1
    for named in (
        'loss.family "softmax" there, "sigmoid" now',
        "optim.lr 0.001 there, 0.002 now",
        "data.path",
        "the weights of teacher 0 (fingerprint",
    ):
        assert named in line, named
    assert (run / CHECKPOINT_NAME).read_bytes() == checkpoint
    # Cadence, workers and more steps in the last stage may change: said in one line.
    status, out, err = cli(*args, "--resume", "--steps", "3", "--set", "log_every=2")
    assert status == 0, err
    assert "resuming with changed settings: eval.every 1 -> 1000, log_every 1 -> 2" in out
    assert load_config(run / "config.json").stages[0].steps == 3


@pytest.mark.slow
def test_ctrl_c_stops_a_cache_build_in_one_line(files):
    cache = files / "cache.safetensors"
    args = base_args(files, "--data", "synthetic", "--set", "data.size=1000000")
    args += ["--teacher-cache", cache, "--build-teacher-cache", "--set", "progress=true"]
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    err_file = files / "build.err"
    with err_file.open("w") as err:
        build = subprocess.Popen(
            [*COMMAND, *map(str, args)], stdout=subprocess.DEVNULL, stderr=err, env=environment
        )
    try:
        wait_for(lambda: "img/s" in err_file.read_text() or build.poll(), "the bar's rate")
        build.send_signal(signal.SIGINT)
        assert build.wait(timeout=120) == 130
    finally:
        build.kill()
    said = err_file.read_text()
    assert "teacher embedding cache:" in said and "/1000000 [" in said  # the total is shown
    line = one_error(said, "interrupted")
    assert "stopped by Ctrl-C; no cache was written" in line and not cache.exists()


def _file_size_limit(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past it fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
def test_a_failed_write_is_one_line_with_its_own_status(files):
    # A file-size limit stands in for a full disk: the checkpoint cannot be written.
    run = files / "run"
    args = base_args(files, "--set", "save_every=1")
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [*COMMAND, *map(str, args)],
        capture_output=True,
        text=True,
        env={**environment, "OMP_NUM_THREADS": "1"},
        preexec_fn=_file_size_limit(1 << 20),
        timeout=600,
    )
    line = one_error(done.stderr)
    assert done.returncode == 3, done.stderr
    assert f"cannot write {run / CHECKPOINT_NAME}: E" in line
    assert not any(path.name.endswith(".tmp") for path in run.iterdir())


@pytest.mark.slow
def test_bad_data_and_runtime_failures_are_one_line(files):
    # A truncated PNG in the data; a cache built on train.tsv, then used with the same rows in
    # another order; no GPU, a corrupt checkpoint, an unknown data kind.
    image = files / "classes" / "red" / "1.png"
    image.write_bytes(image.read_bytes()[:100])
    cache = files / "cache.safetensors"
    lines = [x for x in (files / "train.tsv").read_text().splitlines() if "red/1.png" not in x]
    (files / "ok.tsv").write_text("\n".join(lines) + "\n")
    (files / "reordered.tsv").write_text("\n".join([lines[0], *lines[:0:-1]]) + "\n")
    ok_data = ["--data", f"csv:{files / 'ok.tsv'}", "--teacher-cache", cache]
    assert run_main(base_args(files, *ok_data, "--build-teacher-cache")) == 0
    (files / "corrupt").mkdir()
    patch16 = {**STUDENT_CFG, "vision_cfg": {**STUDENT_CFG["vision_cfg"], "patch_size": 16}}
    (files / "patch16.json").write_text(json.dumps(patch16))
    (files / "corrupt" / CHECKPOINT_NAME).write_bytes(b"\x00" * 64)
    skip = ["--set", "data.skip_bad_samples=true", "--set", "data.max_bad_fraction=0.5"]
    skip += ["--out-dir", files / "skip"]
    ordered = ["--data", f"csv:{files / 'reordered.tsv'}", "--teacher-cache", cache]
    results = cli_parallel(
        base_args(files),
        base_args(files, *skip),
        base_args(files, *ordered, "--out-dir", files / "cached"),
        base_args(files, "--device", "cuda", "--out-dir", files / "gpu"),
        base_args(files, "--resume", "--out-dir", files / "corrupt"),
        base_args(files, "--data", "parquet:x", "--out-dir", files / "parquet"),
        base_args(files, "--out-dir", files / "patch", student=False)
        + ["--student-config", files / "patch16.json"],
        base_args(files, "--batch-size", "1", "--out-dir", files / "one"),
    )
    (status, _, err), (skip_status, skip_out, skip_err) = results[:2]
    line = one_error(err)
    assert status == 2 and "red/1.png (row 1 of" in line and "cannot be read" in line
    assert "--set data.skip_bad_samples=true skips and logs them" in line
    assert skip_status == 0, skip_err
    assert "skipping bad samples (logged in" in skip_out and "skipped " in skip_out
    logged = [json.loads(x) for x in (files / "skip" / "bad_samples.jsonl").open()]
    assert [r["row"] for r in logged] == [1] and logged[0]["file"].endswith("red/1.png")
    assert all(r["bad_samples"] >= 1 for r in metrics(files / "skip")[-1:])

    status, _, err = results[2]
    assert status == 2 and "built on other data: sample 0 ('classes/blue/3.png" in one_error(err)
    status, _, err = results[3]
    if not torch.cuda.is_available():
        assert status == 2 and "device 'cuda': no CUDA GPU is visible" in one_error(err)
    status, _, err = results[4]
    line = one_error(err)
    assert status == 2 and "corrupt training checkpoint" in line and "weights_only" not in line
    status, _, err = results[5]
    assert status == 2 and "unknown data kind 'parquet'" in one_error(err)
    # Another patch size is another token grid, not a student bigger than the teacher.
    status, _, err = results[6]
    line = one_error(err)
    assert status == 2 and "patch size, image size and kernel sizes cannot be changed" in line
    # One pair per batch has no negatives: refused before anything runs, saying why.
    status, _, err = results[7]
    assert status == 2 and "batch size 1 cannot learn" in one_error(err)
    assert not (files / "one").exists()


@pytest.mark.slow
def test_under_torchrun_rank_zero_prints_and_errors_stay_whole(files):
    # One summary and one warning from rank 0; each rank's error is one whole line.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    torchrun += ["--nproc_per_node", "2", "-m", "tinyclip_fast"]
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment["OMP_NUM_THREADS"] = "1"

    def launch(*extra):
        argv = base_args(files, "--data", f"csv:{files / 'train.csv'}")
        argv += ["--set", "optim.warmup_steps=9"]
        done = subprocess.run(
            [*torchrun, *argv, "--steps", "2", *map(str, extra)],
            capture_output=True,
            text=True,
            env=environment,
            timeout=600,
        )
        return done.returncode, done.stdout, done.stderr

    done = launch()
    failed = launch("--device", "cuda:99", "--out-dir", files / "gpu")  # every rank fails
    status, out, err = done
    assert status == 0, err
    assert out.count("done: student") == 1 and out.count("distilling on cpu") == 1
    assert out.count("warning: optim.warmup_steps 9 >= stage 0's 2 steps") == 1
    status, out, err = failed
    ours = [line for line in err.splitlines() if "tinyclip-distill:" in line]
    assert status != 0 and len(ours) == 2, err
    assert all(line.count("tinyclip-distill:") == 1 for line in ours)
    assert sorted(line.split(" error: ")[0] for line in ours) == [
        "tinyclip-distill:", "tinyclip-distill: [rank 1]"
    ]  # fmt: skip
    assert all("device 'cuda:99'" in line for line in ours)


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
        + ["--set", "data.size=100"]
    )
    config = config_from_args(args)
    assert config.optim.lr == 0.2  # --set beats the flag, which beats the file
    assert config.batch_size == 64 and config.optim.betas == (0.9, 0.95)
    assert [s.prune_step for s in config.stages] == [None, 35]
    assert config.stages[1].kind == "auto" and config.data.kind == "synthetic"
    with pytest.raises(ValueError, match="--steps edit single-stage runs"):
        config_from_args(
            parser.parse_args(["--config", str(tmp_path / "run.toml"), "--steps", "0"])
        )

    # --print-config writes a file that --config reads back to the same configuration.
    assert main(["--config", str(tmp_path / "run.toml"), "--print-config"]) == 0
    (tmp_path / "printed.json").write_text(capsys.readouterr().out)
    assert load_config(tmp_path / "printed.json") == load_config(tmp_path / "run.toml")


def test_a_flag_sets_its_own_field_and_keeps_the_file_stage(tmp_path):
    (tmp_path / "auto.toml").write_text(
        "[[stages]]\nsteps = 40\nsparsity = 0.5\nprune_step = 30\nsparsity_warmup = 10\n"
    )
    args = ["--config", str(tmp_path / "auto.toml"), "--data", "synthetic", "--steps", "50"]
    config = config_from_args(build_parser().parse_args(args))
    stage = config.stages[0]
    assert (stage.steps, stage.sparsity, stage.prune_step, stage.sparsity_warmup) == (
        50,
        0.5,
        30,
        10,
    )
    # A flag that cannot hold beside the file's stage is refused naming both; --set clears one.
    with pytest.raises(ValueError, match=r"--preset ViT-8M-16-Text-3M cannot hold beside "):
        config_from_args(build_parser().parse_args([*args, "--preset", "ViT-8M-16-Text-3M"]))
    clear = ["--set", "stages.0.sparsity=null", "--set", "stages.0.prune_step=null"]
    clear += ["--set", "stages.0.sparsity_warmup=null"]
    config = config_from_args(
        build_parser().parse_args([*args, "--preset", "ViT-8M-16-Text-3M", *clear])
    )
    assert config.stages[0].kind == "manual" and config.stages[0].steps == 50


def test_evaluation_cadence_is_the_same_from_a_file_and_from_flags(tmp_path):
    (tmp_path / "eval.toml").write_text('[eval]\nkind = "folder"\npath = "val"\n')
    common = ["--preset", "ViT-8M-16-Text-3M", "--data", "synthetic"]
    from_file = config_from_args(
        build_parser().parse_args([*common, "--config", str(tmp_path / "eval.toml")])
    )
    from_flags = config_from_args(build_parser().parse_args([*common, "--eval", "folder:val"]))
    assert from_file.eval == from_flags.eval and from_flags.eval.every == 1000
    assert from_flags.eval.enabled
    assert not config_from_args(build_parser().parse_args(common)).eval.enabled


def test_end_to_end_from_files_then_resume_finished_run(files):
    extra = ["--eval", f"folder:{files / 'classes'}", "--set", "eval.every=2"]
    extra += ["--set", "save_every=2"]
    assert run_main(base_args(files, *extra)) == 0
    records = metrics(files / "run")
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


@pytest.mark.parametrize(
    "extra, message",
    [
        pytest.param(
            ["--pretrained", "{files}/nope.pt"], "teacher checkpoint", id="missing-weights"
        ),
        pytest.param(
            ["--config", "{files}/nope.toml"], "config file not found", id="missing-config"
        ),
        pytest.param(["--set", "optim.lrr=1"], "unknown config key", id="unknown-key"),
        pytest.param(["--data", "csv:{files}/x.tsv"], "does not exist", id="missing-data"),
        pytest.param(
            ["--student-config", "{files}/nope.pt"], "does not exist", id="missing-student"
        ),
        pytest.param(["--sparsity", "2"], "sparsity must be in", id="sparsity-out-of-range"),
        pytest.param(["--set", "stages=[]"], "stages is empty", id="no-stages"),
        pytest.param(
            ["--distill-weight", "1"], "unrecognized arguments: --distill-weight", id="no-flag"
        ),
        pytest.param(
            ["--eval-every", "5"],
            "unrecognized arguments: --eval-every 5 (a setting: --set eval.every=VALUE)",
            id="setting-spelt-as-a-flag",
        ),
        pytest.param(
            ["--build-reinforced-cache", "--teacher-cache", "c.safetensors"],
            "--build-reinforced-cache writes reinforced data beside --data, and --teacher-cache",
            id="reinforced-build-with-an-embedding-cache",
        ),
        pytest.param(
            ["--build-reinforced-cache", "--build-teacher-cache"],
            "build different caches: give one",
            id="both-cache-builds",
        ),
    ],
)
def test_bad_inputs_exit_with_clear_messages(files, capsys, extra, message):
    extra = [arg.format(files=files) for arg in extra]
    argv = ["--config", extra[1]] if extra[0] == "--config" else base_args(files, *extra)
    try:
        assert run_main(argv) == 2
    except SystemExit as exit_info:  # argparse errors
        assert exit_info.code == 2
    assert message in capsys.readouterr().err


def test_build_teacher_cache_then_distill_from_it(files, capsys):
    cache = str(files / "teacher_cache.safetensors")
    assert run_main(base_args(files, "--teacher-cache", cache, "--build-teacher-cache")) == 0
    assert "wrote 8 teacher embeddings" in capsys.readouterr().out
    assert run_main(base_args(files, "--teacher-cache", cache)) == 0
    records = metrics(files / "run")
    assert len(records) == 4 and all(r["loss"] > 0 for r in records)


def test_reinforced_cache_built_then_trained_from_then_refused_when_built_otherwise(files, capsys):
    # A webdataset corpus: cache in reinforced.cache_dir, rebuilt as a no-op, trained from.
    write_image_shards(files / "shards", num_shards=2, per_shard=3, synthetic=2)
    cache_dir = files / "cache"
    build = base_args(files, "--build-reinforced-cache", student=False, data=False)
    build += ["--data", f"webdataset:{files / 'shards'}/{{00000..00001}}.tar"]
    build += ["--set", f"reinforced.cache_dir={cache_dir}", "--set", "reinforced.augmentations=3"]
    build += ["--set", "reinforced.dtype=bf16"]
    assert run_main(build) == 0
    assert "rank 0 of 1 built 2 shard files (6 images" in capsys.readouterr().out
    header = read_header(cache_dir / "00001.reinforced.safetensors")
    assert (header["num_augmentations"], header["dtype"], header["num_samples"]) == (3, "bf16", 3)
    assert run_main(build) == 0
    assert "built 0 shard files (0 images, 0.0 images/s), 2 were already built" in (
        capsys.readouterr().out
    )
    train = [
        "--data",
        f"reinforced:{files / 'shards'}",
        "--set",
        f"reinforced.cache_dir={cache_dir}",
    ]
    assert run_main(base_args(files, *train)) == 0
    assert "no teacher forward in any step" in capsys.readouterr().out
    records = metrics(files / "run")
    assert len(records) == 4 and all(r["loss"] > 0 for r in records)
    # The split image pipeline replays the same stored crops.
    split = [*train, "--set", "data.decode=tensor", "--out-dir", files / "split"]
    assert run_main(base_args(files, *split)) == 0
    replayed = metrics(files / "split")
    assert [r["step"] for r in replayed] == [r["step"] for r in records]
    # Same crops, pixels within a few levels: the first losses differ, but barely.
    assert replayed[0]["loss"] != records[0]["loss"]
    assert abs(replayed[0]["loss"] - records[0]["loss"]) < 0.01 * records[0]["loss"]
    # A CSV: cache files beside it.
    csv_build = ["--build-reinforced-cache", "--set", "reinforced.augmentations=2"]
    assert run_main(base_args(files, *csv_build)) == 0
    assert (files / "train.tsv-00000.reinforced.safetensors").is_file()
    csv = ["--data", f"reinforced:{files / 'train.tsv'}", "--set", "reinforced.caption_mode=real"]
    assert run_main(base_args(files, *csv, "--overwrite")) == 0
    # Built with another K, or training with another teacher: refused naming what differs.
    capsys.readouterr()
    path = cache_dir / "00000.reinforced.safetensors"
    assert run_main([*build, "--set", "reinforced.augmentations=4"]) == 2
    assert f"{path} was built with another num augmentations: 3 != 4" in capsys.readouterr().err
    torch.manual_seed(11)
    torch.save(open_clip.model.CLIP(**TEACHER_CFG).state_dict(), files / "other.pt")
    assert (
        run_main(base_args(files, *train, "--pretrained", files / "other.pt", "--overwrite")) == 2
    )
    assert f"{path} was built with another teacher: [" in capsys.readouterr().err
    assert run_main([*build, "--set", "reinforced.augmentations=0"]) == 2
    assert "reinforced.augmentations must be > 0, got 0" in capsys.readouterr().err
    assert run_main([*build, "--data", "synthetic"]) == 2
    assert "builds a reinforced cache over --data webdataset:" in capsys.readouterr().err
    path.write_bytes(path.read_bytes()[:100])  # truncated
    assert run_main(base_args(files, *train, "--overwrite")) == 2
    assert f"reinforced cache {path} is truncated, corrupt" in capsys.readouterr().err


def test_distill_from_datacompdr_shards(files, capsys):
    write_datacompdr_shards(files)  # two shards of three samples, two teachers of 8 and 6 dims
    data = f"datacompdr:{files}/{{00000000..00000001}}.tar"
    argv = base_args(files, "--data", data, "--set", "data.options.teacher_dims=[8,6]")
    assert run_main(argv) == 0
    out = capsys.readouterr().out
    assert "the data holds 2 teachers' embeddings (ViT-L-14/openai, " in out
    assert "this run distils from their ensemble" in out
    assert "no teacher forward in any step (DataCompDR's teachers" in out
    records = metrics(files / "run")
    assert len(records) == 4 and all(r["loss"] > 0 for r in records)
    # Embeddings that do not split as the teachers say are an error naming the sample.
    argv = base_args(files, "--data", data, "--overwrite")
    assert run_main(argv) == 2
    assert "embeddings are 14-d, the teachers [768, 768] sum to 1536" in capsys.readouterr().err


@pytest.mark.slow
def test_under_torchrun_every_rank_builds_its_own_cache_shards(files):
    write_image_shards(files / "shards", num_shards=3, per_shard=2, synthetic=0)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    torchrun += ["--nproc_per_node", "2", "-m", "tinyclip_fast"]
    argv = base_args(files, "--build-reinforced-cache", data=False)
    argv += ["--set", f"reinforced.cache_dir={files / 'cache'}"]
    argv += ["--data", f"webdataset:{files / 'shards'}/{{00000..00002}}.tar"]
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [*torchrun, *map(str, argv)], capture_output=True, text=True, env=environment, timeout=600
    )
    assert done.returncode == 0, done.stderr
    # Rank 0 built shards 0 and 2, rank 1 shard 1; rank 0 alone reports.
    assert done.stdout.count("reinforced cache (") == 1
    assert "rank 0 of 2 built 2 shard files (4 images" in done.stdout
    built = sorted(p.name for p in (files / "cache").iterdir())
    assert built == [f"0000{i}.reinforced.safetensors" for i in range(3)]


def test_teacher_flags_pair_in_order_and_config_tables(tmp_path, capsys):
    def parse(*argv):
        args = build_parser().parse_args([*argv, "--preset", "ViT-8M-16-Text-3M"])
        return config_from_args(args)

    def error_of(*argv):
        assert run_main([*argv, "--preset", "ViT-8M-16-Text-3M", "--print-config"]) == 2
        return one_error(capsys.readouterr().err)

    config = parse(
        "--teacher", "A", "--pretrained", "a.pt", "--teacher", "B", "--pretrained", "b.pt",
        "--loss", "sigmoid", "--set", "teachers.0.logit_bias=null",
        "--set", "teachers.1.logit_bias=-10",
    )  # fmt: skip
    assert [(t.model, t.pretrained, t.logit_bias) for t in config.teachers] == [
        ("A", "a.pt", None),
        ("B", "b.pt", -10.0),
    ]
    assert config.loss.family == "sigmoid" and config.teacher.pretrained is None
    # One teacher keeps the single spelling (and the last --pretrained wins).
    config = parse("--teacher", "A", "--pretrained", "x", "--pretrained", "a.pt")
    assert (config.teacher.model, config.teacher.pretrained, config.teachers) == ("A", "a.pt", [])
    # [[teachers]] tables in a config file; flags and --set edit them.
    (tmp_path / "run.toml").write_text(
        '[loss]\nfamily = "sigmoid"\n[[teachers]]\nmodel = "A"\npretrained = "a.pt"\n'
        '[[teachers]]\nmodel = "B"\npretrained = "b.pt"\nlogit_bias = -10.0\n'
    )
    config = parse("--config", str(tmp_path / "run.toml"), "--pretrained", "x", "--pretrained",
                   "y", "--set", "teachers.0.logit_bias=-3")  # fmt: skip
    assert [(t.model, t.pretrained, t.logit_bias) for t in config.teachers] == [
        ("A", "x", -3.0),
        ("B", "y", -10.0),
    ]
    config = parse("--set", 'teachers=[{"model": "A"}, {"model": "B"}]', "--set",
                   "loss.family=sigmoid", "--set", "teachers.1.logit_bias=-5")  # fmt: skip
    assert [t.logit_bias for t in config.teachers] == [None, -5.0]


@pytest.mark.parametrize(
    "argv, message",
    [
        pytest.param(
            [arg for k in range(5) for arg in ("--teacher", f"M{k}")],
            "5 --teacher given; an ensemble has at most 4",
            id="more-than-four-teachers",
        ),
        pytest.param(
            ["--teacher", "A", "--teacher", "B", "--pretrained", "a.pt"],
            "1 --pretrained for 2 teachers (A, B): give one --pretrained per --teacher",
            id="pretrained-count",
        ),
        pytest.param(
            ["--loss", "sigmoid", "--set", "teacher.logit_bias=minus ten"],
            "teacher.logit_bias must be a number or null, got 'minus ten'",
            id="bias-not-a-number",
        ),
        pytest.param(
            ["--set", "teacher.logit_bias=-10"],
            "logit_bias is for --loss sigmoid",
            id="bias-under-softmax",
        ),
        pytest.param(
            ["--config", "run.toml", "--set", "teacher.pretrained=z"],
            "either as teacher.model/pretrained/logit_bias or as [[teachers]]",
            id="teacher-and-teachers",
        ),
    ],
)
def test_teacher_mistakes_are_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "run.toml").write_text('[[teachers]]\nmodel = "A"\n[[teachers]]\nmodel = "B"\n')
    argv = [str(tmp_path / arg) if arg.endswith(".toml") else arg for arg in argv]
    assert run_main([*argv, "--preset", "ViT-8M-16-Text-3M", "--print-config"]) == 2
    assert message in one_error(capsys.readouterr().err)


def test_ensemble_and_sigmoid_runs_from_the_command_line(files, capsys):
    torch.manual_seed(4)
    torch.save(open_clip.model.CLIP(**TEACHER_CFG).state_dict(), files / "teacher2.pt")
    second = ["--teacher", files / "cli-tiny-teacher.json", "--pretrained", files / "teacher2.pt"]
    sigmoid = ["--loss", "sigmoid", "--set", "teachers.0.logit_bias=-4"]
    sigmoid += ["--set", "teachers.1.logit_bias=-6"]
    cache = files / "teachers.safetensors"
    build = base_args(files, *second, "--teacher-cache", cache, "--build-teacher-cache")
    assert run_main(build) == 0
    assert "wrote 8 teacher embeddings (dim 32, 32) of 2 teacher(s)" in capsys.readouterr().out
    assert run_main(base_args(files, *second, *sigmoid, "--teacher-cache", cache)) == 0
    records = metrics(files / "run")
    assert len(records) == 4 and all(r["loss"] > 0 for r in records)
    student = load_student(files / "run" / "student")
    assert student.logit_bias is not None and float(student.logit_bias.detach()) != -10.0
    # The cache of two teachers refuses a run with one; a softmax teacher needs a bias.
    assert run_main(base_args(files, "--teacher-cache", cache, "--overwrite")) == 2
    assert "built by 2 teacher(s), this run has 1" in one_error(capsys.readouterr().err)
    assert run_main(base_args(files, "--loss", "sigmoid", "--overwrite")) == 2
    assert "teacher 0 (" in (line := one_error(capsys.readouterr().err))
    assert "has no logit_bias" in line and "teacher.logit_bias" in line
    # A teacher that reads other inputs (64-pixel images) is refused, naming the difference.
    bigger = {**TEACHER_CFG, "vision_cfg": {**TEACHER_CFG["vision_cfg"], "image_size": 64}}
    (files / "cli-64px-teacher.json").write_text(json.dumps(bigger))
    torch.save(open_clip.model.CLIP(**bigger).state_dict(), files / "teacher64.pt")
    other = ["--teacher", files / "cli-64px-teacher.json", "--pretrained", files / "teacher64.pt"]
    assert run_main(base_args(files, *other, "--overwrite")) == 2
    line = one_error(capsys.readouterr().err)
    assert "does not read the inputs of teacher 0" in line and "(32, 32) != (64, 64)" in line
    # A reinforced cache of the ensemble holds both teachers per sample and trains from both.
    write_image_shards(files / "shards", num_shards=1, per_shard=4, synthetic=0)
    shards = f"webdataset:{files / 'shards'}/{{00000..00000}}.tar"
    build = base_args(files, *second, "--build-reinforced-cache", student=False, data=False)
    assert run_main([*build, "--data", shards, "--set", "reinforced.augmentations=2"]) == 0
    header = read_header(files / "shards" / "00000.reinforced.safetensors")
    assert [t["dim"] for t in header["teachers"]] == [32, 32]
    capsys.readouterr()
    train = ["--data", f"reinforced:{files / 'shards'}", "--overwrite"]
    assert run_main(base_args(files, *second, *train)) == 0
    assert "the data holds 2 teachers' embeddings" in capsys.readouterr().out


def test_docs_list_every_data_kinds_options():
    from tinyclip_fast.data.options import DATA_OPTIONS
    from tinyclip_fast.demo.plugins import DEMO_DATA_OPTIONS

    text = (Path(__file__).parents[1] / "docs" / "cli.md").read_text()
    rows = {line.split("|")[1].strip(" `"): line for line in text.splitlines() if "| `" in line}
    for kind, options in {**DATA_OPTIONS, "demo": DEMO_DATA_OPTIONS}.items():
        assert kind in rows, f"docs/cli.md lists no data options of {kind}"
        for key, help_text in options.items():
            assert f"`{key}`: {help_text}" in rows[kind], (kind, key)


@pytest.mark.parametrize(
    "uniform, loader",
    [
        (True, "open_clip.create_model('local-dir:{}')"),
        (False, "tinyclip_fast.load_student('{}')"),
    ],
    ids=["uniform-widths", "per-layer-widths"],
)
def test_the_end_line_names_what_loads_the_student(tmp_path, uniform, loader):
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"open_clip_compatible": uniform}))
    line = _done_line(tmp_path, 1234)
    assert line.startswith(f"done: student with 1,234 parameters in {tmp_path}; ")
    assert f"{loader.format(tmp_path)} loads it" in line
    assert ("save_hf_clip" in line) == uniform


def test_the_split_image_pipeline_trains_resumes_exactly_and_records_data_wait(files):
    # data.decode=tensor on the CPU: the loader hands uint8 crops, the device half finishes.
    split = ["--set", "data.decode=tensor", "--set", "save_every=2"]
    assert run_main(base_args(files, *split)) == 0
    whole = [r for r in metrics(files / "run") if "loss" in r]
    assert all(r["data_wait_ms"] >= 0 and 0 <= r["data_wait_share"] <= 1 for r in whole)
    halves = [*split, "--out-dir", files / "halves"]
    assert run_main(base_args(files, *halves, "--steps", "2")) == 0
    assert run_main(base_args(files, *halves, "--resume")) == 0
    resumed = [r for r in metrics(files / "halves") if "loss" in r]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole]
    # The setting reaches the run: the GPU decoder is refused on the CPU, in one line.
    nvjpeg = ["--set", "data.decode=nvjpeg", "--out-dir", files / "gpu", "--steps", "1"]
    assert run_main(base_args(files, *nvjpeg)) == 2
