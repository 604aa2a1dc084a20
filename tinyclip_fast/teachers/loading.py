"""The frozen teachers of a run, one or an ensemble of K <= MAX_TEACHERS: building them,
their logit scales and biases, and their embeddings of a batch.

A teacher is an open_clip model built from a name or model-config file, or a Hugging Face
``transformers`` CLIPModel folder (``hf:DIR``: a released TinyCLIP model, any CLIP-architecture
checkpoint; needs ``pip install 'tinyclip-fast[hf]'``); other teachers plug in by name with
:func:`register_teacher` (the built-in demo registers ``"demo"`` this way), so this
module never imports the code that provides them.

Weight inheritance (manual and automatic) reads the FIRST teacher only. Every teacher scores
the same images and tokens, so each must share the first teacher's tokenizer and
preprocessing (train and eval): a difference is refused, naming it. Teachers only run
forward, through ``encode_image`` / ``encode_text``, so open_clip models with timm towers
(SigLIP, ConvNeXt, EVA) work as teachers; nothing here reads a tower's internals.

A teacher's configuration is anything with the fields of ``train.config.TeacherConfig``
(``model``, ``pretrained``, ``logit_bias``): :class:`TeacherSpec`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from tinyclip_fast.inheritance import HF_PREFIX
from tinyclip_fast.kernels.limits import MAX_TEACHERS

TeacherBuilder = Callable[[str | None], tuple[nn.Module, Callable, Callable, Callable]]
_TEACHERS: dict[str, TeacherBuilder] = {}

# The autocast dtype of each precision name (None: no autocast).
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Captions whose tokens tell tokenizers apart (case, punctuation, digits, length).
PROBE_TEXTS = (
    "a photo of a cat.",
    "A Diagram: 3 dogs & 1 bird, in 2024!",
    "an extraordinarily long caption " * 12,
)


class TeacherSpec(Protocol):
    """What this package reads of a teacher's configuration (train.config.TeacherConfig)."""

    model: str
    pretrained: str | None
    logit_bias: float | None


def register_teacher(name: str, builder: TeacherBuilder) -> None:
    """Make ``teacher.model = name`` call ``builder(teacher.pretrained)``, which returns
    (teacher, tokenizer, train preprocess, eval preprocess)."""
    _TEACHERS[name] = builder


def build_teacher(config: TeacherSpec) -> tuple[nn.Module, Callable, Callable, Callable]:
    """(teacher, tokenizer, train preprocess, eval preprocess) from an open_clip name.

    ``model`` may also be a path to an open_clip model-config JSON (registered under its stem),
    ``hf:DIR`` (a transformers CLIPModel folder, its weights, tokenizer and preprocessing) or a
    name given to :func:`register_teacher`. ``pretrained`` is a local checkpoint file (works
    offline) or an open_clip pretrained tag.
    """
    if config.model in _TEACHERS:
        return _TEACHERS[config.model](config.pretrained)
    if config.model.startswith(HF_PREFIX):
        return _hf_teacher(config)
    import open_clip  # seconds to import: only when an open_clip teacher is asked for

    name = config.model
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"teacher model config {path} does not exist")
        open_clip.add_model_config(path)
        name = path.stem
    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {name!r}; see open_clip.list_models()")
    pretrained = config.pretrained
    if pretrained is not None and _looks_like_path(pretrained) and not Path(pretrained).is_file():
        raise FileNotFoundError(f"teacher checkpoint {pretrained} does not exist")
    if pretrained is None:
        raise ValueError(
            "teacher.pretrained is required: a local checkpoint file or an open_clip tag "
            f"(open_clip.list_pretrained_tags_by_model({name!r}))"
        )
    try:
        model, train_tf, eval_tf = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, require_pretrained=True
        )
    except (RuntimeError, OSError) as err:
        # open_clip raises RuntimeError for unknown tags, failed downloads, bad state dicts.
        raise ValueError(f"cannot load teacher {name} from {pretrained!r}: {err}") from err
    return model, open_clip.get_tokenizer(name), train_tf, eval_tf


def _hf_teacher(config: TeacherSpec) -> tuple[nn.Module, Callable, Callable, Callable]:
    directory = config.model.removeprefix(HF_PREFIX)
    if not directory:
        raise ValueError(f"teacher {config.model!r}: name the folder, e.g. hf:./TinyCLIP-ViT-61M")
    if config.pretrained is not None:
        raise ValueError(
            f"teacher {config.model} holds its own weights: give it no pretrained "
            f"({config.pretrained!r} given)"
        )
    from tinyclip_fast.inheritance.hf import load_hf_teacher  # transformers: the optional extra

    return load_hf_teacher(directory)


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith((".pt", ".pth", ".bin", ".safetensors"))


def build_teachers(
    configs: Sequence[TeacherSpec],
) -> tuple[list[nn.Module], Callable, Callable, Callable]:
    """(teachers, tokenizer, train preprocess, eval preprocess): the processing is the first
    teacher's, which every other teacher must share (ValueError naming the difference)."""
    check_teacher_count(len(configs))
    built = [build_teacher(config) for config in configs]
    for k in range(1, len(built)):
        difference = input_difference(built[0], built[k])
        if difference:
            raise ValueError(
                f"teacher {k} ({configs[k].model}) does not read the inputs of teacher 0 "
                f"({configs[0].model}): {difference}. Every teacher of an ensemble scores the "
                "same images and tokens (teacher 0's preprocessing and tokenizer, the "
                "student's): pick teachers that share them"
            )
    model, tokenizer, train_tf, eval_tf = built[0]
    return [b[0] for b in built], tokenizer, train_tf, eval_tf


def check_teacher_count(count: int) -> None:
    if not 1 <= count <= MAX_TEACHERS:
        raise ValueError(f"{count} teachers given; give 1 to {MAX_TEACHERS}")


def input_difference(first: tuple, other: tuple) -> str | None:
    """What differs between two (teacher, tokenizer, train_tf, eval_tf) in the inputs they
    read: image size, preprocessing, tokens of probe captions; None when nothing does."""
    model_a, tok_a, train_a, eval_a = first
    model_b, tok_b, train_b, eval_b = other
    size_a, size_b = _image_size(model_a), _image_size(model_b)
    if size_a != size_b:
        return f"image size {size_a} != {size_b}"
    for what, a, b in (("eval", eval_a, eval_b), ("train", train_a, train_b)):
        if repr(a) != repr(b):
            return f"{what} preprocessing differs: {_one_line(a)} != {_one_line(b)}"
    tokens_a, tokens_b = tok_a(list(PROBE_TEXTS)), tok_b(list(PROBE_TEXTS))
    if tokens_a.shape != tokens_b.shape or not torch.equal(tokens_a, tokens_b):
        return (
            f"tokenizers differ (tokens of {PROBE_TEXTS[0]!r}: "
            f"{tokens_a[0, :8].tolist()}... != {tokens_b[0, :8].tolist()}..., context "
            f"{tokens_a.shape[-1]} vs {tokens_b.shape[-1]})"
        )
    return None


def _image_size(model: nn.Module) -> tuple[int, int]:
    size = getattr(model.visual, "image_size", None)
    if isinstance(size, int):
        return (size, size)
    return tuple(size) if size is not None else None


def _one_line(transform: object) -> str:
    return " ".join(repr(transform).split())


def dataset_defaults(teacher: nn.Module, seed: int) -> dict[str, Any]:
    """Synthetic/demo data shaped for the teacher (image size, context length, vocabulary)."""
    size = teacher.visual.image_size
    return {
        "image_size": size[0] if isinstance(size, (tuple, list)) else size,
        "context_length": teacher.context_length,
        "vocab_size": teacher.vocab_size,
        "seed": seed,
    }


def own_logit_scale(teacher: nn.Module) -> float:
    """A teacher's log-space logit scale (its affinity scale is the exp of it)."""
    return float(teacher.logit_scale.detach().float().reshape(-1)[0])


def own_logit_bias(teacher: nn.Module) -> float | None:
    """A teacher's own logit bias (open_clip's ``logit_bias``; None for softmax CLIPs)."""
    bias = getattr(teacher, "logit_bias", None)
    return None if bias is None else float(bias.detach().float().reshape(-1)[0])


def teacher_biases(
    configs: Sequence[TeacherSpec], own: Sequence[float | None], say: Callable[[str], None]
) -> list[float]:
    """The bias c_k of each teacher's sigmoid probabilities: the configured one, else the
    teacher's own ``own[k]``; a teacher with neither (a softmax CLIP teacher) is refused.
    ``configs`` holds one entry per teacher (ValueError otherwise, when one gives a bias)."""
    names = [config.model for config in configs]
    given = [config.logit_bias for config in configs]
    if len(configs) != len(own):
        if any(bias is not None for bias in given):
            raise ValueError(
                f"{len(configs)} teacher configs give logit biases for {len(own)} teachers: "
                "give one entry per teacher"
            )
        names, given = [f"#{k}" for k in range(len(own))], [None] * len(own)
    biases = []
    for k, (name, mine, theirs) in enumerate(zip(names, given, own, strict=True)):
        if mine is None and theirs is None:
            raise ValueError(
                f"--loss sigmoid: teacher {k} ({name}) has no logit_bias (a "
                "softmax-trained CLIP): give --set teacher.logit_bias=B (its targets become "
                "s(b x.y + B), e.g. -10), or distil from sigmoid (SigLIP) teachers"
            )
        if mine is not None and theirs is not None and mine != theirs:
            say(f"teacher {k} ({name}): logit bias {mine:g} given, not its own {theirs:g}")
        biases.append(float(mine if mine is not None else theirs))
    return biases


def precision_autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast of a teachers' forward under ``precision`` (a key of AUTOCAST_DTYPES)."""
    dtype = AUTOCAST_DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def teacher_embeddings(
    teacher: nn.Module,
    images: torch.Tensor,
    texts: torch.Tensor,
    micro_batch: int,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised (I_t, T_t) of one teacher in micro-batches, forward only.

    ``no_grad``, not ``inference_mode``: the loss saves these tensors for its backward.
    """
    image_parts, text_parts = [], []
    with autocast():
        for s in range(0, images.shape[0], micro_batch):
            image_parts.append(teacher.encode_image(images[s : s + micro_batch], normalize=True))
            text_parts.append(teacher.encode_text(texts[s : s + micro_batch], normalize=True))
    return torch.cat(image_parts), torch.cat(text_parts)
