"""Zero-shot classification accuracy of a CLIP model on a labelled image set.

Class weights W [d, C] are open_clip's prompt ensemble: the mean over templates of the
normalised text embeddings of ``template.format(class)``, renormalised. An image with
normalised feature f is predicted as argmax_c (f W)_c; top-1 is the fraction right.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from torch import nn
from torch.utils.data import Dataset

from tinyclip_fast.data.datasets import csv_separator, describe_error
from tinyclip_fast.data.images import file_problem, open_rgb
from tinyclip_fast.data.loader import BadSampleError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
DEFAULT_TEMPLATES = ("a photo of a {}.",)


class ZeroShotEvaluator:
    """``evaluator(model) -> top-1`` on fixed labelled images; the model is left as it was.

    ``images`` is a float tensor [N, 3, H, W] with ``labels`` [N], or a Dataset whose items
    are dicts with "image" and "label" or (image, label) tuples (``labels`` then None).
    """

    def __init__(
        self,
        images: torch.Tensor | Dataset,
        labels: torch.Tensor | Sequence[int] | None,
        class_names: Sequence[str],
        templates: Sequence[str | Callable[[str], str]],
        tokenizer: Callable[[list[str]], torch.Tensor],
        device: str | torch.device = "cpu",
        batch_size: int = 256,
    ) -> None:
        if not class_names:
            raise ValueError("class_names is empty")
        if not templates:
            raise ValueError("templates is empty")
        _check_templates(templates, "ZeroShotEvaluator")
        if isinstance(images, torch.Tensor):
            if images.dim() != 4 or not images.is_floating_point():
                raise ValueError(
                    f"images must be a float tensor [N, 3, H, W], got {tuple(images.shape)} "
                    f"{images.dtype}"
                )
            if labels is None:
                raise ValueError("labels are required when images is a tensor")
        labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        size = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
        if labels is not None and tuple(labels.shape) != (size,):
            raise ValueError(f"labels must have shape ({size},), got {tuple(labels.shape)}")
        if size == 0:
            raise ValueError("the labelled image set is empty")
        if labels is not None and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise ValueError(
                f"labels must lie in [0, {len(class_names)}), got [{int(labels.min())}, "
                f"{int(labels.max())}]"
            )
        self.images, self.labels = images, labels
        self.class_names, self.templates = list(class_names), list(templates)
        self.tokenizer, self.device, self.batch_size = tokenizer, torch.device(device), batch_size

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images [b, 3, H, W], labels [b]) in order."""
        size = self.images.shape[0] if isinstance(self.images, torch.Tensor) else len(self.images)
        for start in range(0, size, self.batch_size):
            stop = min(start + self.batch_size, size)
            if isinstance(self.images, torch.Tensor):
                yield self.images[start:stop], self.labels[start:stop]
                continue
            if hasattr(self.images, "get_batch"):
                batch = self.images.get_batch(torch.arange(start, stop))
                images, labels = batch["image"], batch.get("label")
            else:
                items = [self.images[i] for i in range(start, stop)]
                pairs = [(x["image"], x.get("label")) if isinstance(x, dict) else x for x in items]
                images = torch.stack([image for image, _ in pairs])
                labels = None
                if all(label is not None for _, label in pairs):
                    labels = torch.tensor([int(label) for _, label in pairs])
            if self.labels is not None:
                labels = self.labels[start:stop]
            if labels is None:
                raise ValueError("the dataset's items carry no label and no labels were given")
            yield images, labels

    def classifier(self, model: nn.Module) -> torch.Tensor:
        """Class weights [d, C] of ``model`` (prompt-ensembled, L2-normalised columns)."""
        return build_zero_shot_classifier(
            model, self.tokenizer, self.class_names, self.templates, device=self.device
        )

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> float:
        """Top-1 accuracy in [0, 1]."""
        was_training = model.training
        model.eval()
        try:
            weights = self.classifier(model)
            correct = total = 0
            for images, labels in self._batches():
                features = model.encode_image(images.to(self.device), normalize=True)
                predicted = (features.float() @ weights.float()).argmax(dim=-1).cpu()
                correct += int((predicted == labels).sum())
                total += labels.numel()
        finally:
            model.train(was_training)
        return correct / total


class LabelledImageFiles(Dataset):
    """Image files with integer labels, loaded and preprocessed on access."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], preprocess: Callable) -> None:
        self.paths, self.labels, self.preprocess = list(paths), list(labels), preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        problem = file_problem(path)
        if problem is not None:
            raise FileNotFoundError(f"evaluation image {path} {problem}")
        try:
            image = self.preprocess(open_rgb(path))
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, zlib errors...
            raise BadSampleError(
                f"evaluation image {path} cannot be read: {describe_error(err)}"
            ) from err
        return {"image": image, "label": self.labels[index]}


def load_image_folder(
    root: str | Path, preprocess: Callable
) -> tuple[LabelledImageFiles, list[str]]:
    """ImageFolder layout ``root/<class>/<image>``: (dataset, class names from folder names).

    Folders are sorted by name; underscores in folder names become spaces.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = sorted(child for child in root.iterdir() if child.is_dir())
    if not classes:
        raise ValueError(f"image folder {root} has no class subfolders")
    paths, labels = [], []
    for label, folder in enumerate(classes):
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(path)
                labels.append(label)
    if not paths:
        raise ValueError(f"image folder {root} has class folders but no images {IMAGE_SUFFIXES}")
    names = [folder.name.replace("_", " ") for folder in classes]
    return LabelledImageFiles(paths, labels, preprocess), names


def read_csv_rows(
    path: Path, keys: Sequence[str], what: str, separator: str | None = None
) -> list[dict[str, str]]:
    """The rows of a CSV/TSV file that must have the columns ``keys`` (``what`` names the file
    in errors); the separator defaults to the extension's: ``.csv`` comma, else tab."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    separator = csv_separator(path, separator)
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=separator)
        columns = reader.fieldnames or []
        for key in keys:
            if key not in columns:
                raise ValueError(
                    f"{what} {path} has no column {key!r}; columns found with separator "
                    f"{separator!r}: {columns}"
                )
        rows = list(reader)
    if not rows:
        raise ValueError(f"{what} {path} has a header but no rows")
    return rows


def beside(csv_path: Path, image: str) -> Path:
    """An image path of a CSV row: absolute as given, else relative to the CSV's folder."""
    return Path(image) if Path(image).is_absolute() else csv_path.parent / image


def load_labelled_csv(
    path: str | Path,
    preprocess: Callable,
    *,
    img_key: str = "filepath",
    label_key: str = "label",
    separator: str | None = None,
) -> LabelledImageFiles:
    """CSV of image paths (relative to the CSV's folder) and integer labels (0-based). The
    separator defaults to the extension's: ``.csv`` comma, else tab."""
    path = Path(path)
    rows = read_csv_rows(path, (img_key, label_key), "labelled CSV", separator)
    paths = [beside(path, row[img_key]) for row in rows]
    try:
        labels = [int(row[label_key]) for row in rows]
    except ValueError as err:
        raise ValueError(f"labelled CSV {path}: column {label_key!r} must hold integers") from err
    return LabelledImageFiles(paths, labels, preprocess)


def load_names(path: str | Path) -> list[str]:
    """Class names or templates from a text file (one per line) or a JSON list."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        names = json.loads(text)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{path} must hold a JSON list of strings")
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path} holds no names")
    return names


def load_class_names_and_templates(path: str | Path) -> tuple[list[str], list[str]]:
    """JSON file ``{"classnames": [...], "templates": [...]}`` (templates contain ``{}``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    values = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(values, dict) or "classnames" not in values:
        raise ValueError(f"{path} must be a JSON object with 'classnames' (and 'templates')")
    templates = values.get("templates", list(DEFAULT_TEMPLATES))
    return list(values["classnames"]), list(templates)


def _check_templates(templates: Sequence[str | Callable[[str], str]], where: str) -> None:
    missing = [t for t in templates if isinstance(t, str) and "{}" not in t]
    if missing:
        raise ValueError(f"{where}: templates need a '{{}}' for the class name: {missing[:3]}")
