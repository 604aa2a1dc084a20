"""Retrieval recall@k against a brute-force float64 reference written here (sort every
query's candidates, ties ranked against the query), with several captions per image, exact
ties and NaN features; the evaluator on a real open_clip CLIP; the pairs CSV."""

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from support import TEXT, WordTokenizer, random_image

from tinyclip_fast.data.retrieval import (
    RECALL_KS,
    RetrievalEvaluator,
    load_retrieval_pairs,
    retrieval_recalls,
)


def reference_recalls(image, text, text_image, ks=RECALL_KS):
    """Sort each query's candidates by float64 score, wrong ones first among equals; a query
    is a hit at k when a right candidate is among the first k."""
    image, text = image.double(), text.double()
    scores = (text @ image.T).nan_to_num(nan=-math.inf).tolist()
    owners = text_image.tolist()

    def hit(row, right, k):
        order = sorted(range(len(row)), key=lambda j: (-row[j], right(j)))
        return any(right(j) for j in order[:k])

    metrics = {}
    for k in ks:
        text_hits = [
            hit([scores[t][i] for t in range(len(owners))], lambda t, i=i: owners[t] == i, k)
            for i in range(image.shape[0])
        ]
        image_hits = [hit(scores[t], lambda i, t=t: owners[t] == i, k) for t in range(len(owners))]
        metrics[f"text_retrieval_recall@{k}"] = sum(text_hits) / len(text_hits)
        metrics[f"image_retrieval_recall@{k}"] = sum(image_hits) / len(image_hits)
    return metrics


def clip_benchmark_recalls(image, text, text_image, k):
    """clip_benchmark's topk formula, valid where no scores tie."""
    scores = text @ image.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(text_image)), text_image] = True

    def recall(s, p):
        top = torch.topk(s, k, dim=1).indices
        return (p.gather(1, top).sum(dim=1) > 0).double().mean().item()

    return {
        f"image_retrieval_recall@{k}": recall(scores, positive),
        f"text_retrieval_recall@{k}": recall(scores.T, positive.T),
    }


def _owners(num_images, num_texts, generator):
    """Each image gets at least one caption; the rest go to random images."""
    extra = torch.randint(0, num_images, (num_texts - num_images,), generator=generator)
    owners = torch.cat([torch.arange(num_images), extra])
    return owners[torch.randperm(num_texts, generator=generator)]


def _assert_equal_metrics(actual, expected):
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.parametrize("num_images,num_texts", [(1, 3), (7, 7), (12, 40), (30, 31)])
def test_random_features_match_both_references(num_images, num_texts):
    g = torch.Generator().manual_seed(num_images * 100 + num_texts)
    image = F.normalize(torch.randn(num_images, 8, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(num_texts, 8, generator=g, dtype=torch.float64), dim=-1)
    owners = _owners(num_images, num_texts, g)
    actual = retrieval_recalls(image, text, owners)
    _assert_equal_metrics(actual, reference_recalls(image, text, owners))
    for k in RECALL_KS:
        if k <= num_images:
            expected = clip_benchmark_recalls(image, text, owners, k)
            assert actual[f"image_retrieval_recall@{k}"] == pytest.approx(
                expected[f"image_retrieval_recall@{k}"]
            )
        if k <= num_texts:
            expected = clip_benchmark_recalls(image, text, owners, k)
            assert actual[f"text_retrieval_recall@{k}"] == pytest.approx(
                expected[f"text_retrieval_recall@{k}"]
            )


def test_several_captions_one_image_hit_is_enough():
    # Image 0's captions: one opposite (text 0) and one identical (text 1): a hit at 1.
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    owners = torch.tensor([0, 0, 1])
    metrics = retrieval_recalls(image, text, owners, ks=(1,))
    assert metrics["text_retrieval_recall@1"] == 1.0
    # Text 0 (image 0) scores image 1 higher: a miss; texts 1 and 2 hit.
    assert metrics["image_retrieval_recall@1"] == pytest.approx(2 / 3)
    _assert_equal_metrics(metrics, reference_recalls(image, text, owners, ks=(1,)))


@pytest.mark.parametrize("seed", range(4))
def test_exact_ties_rank_against_the_query(seed):
    g = torch.Generator().manual_seed(seed)
    # Features from a handful of one-hot directions: most scores tie exactly (0 or 1).
    image = torch.eye(4)[torch.randint(0, 4, (15,), generator=g)]
    text = torch.eye(4)[torch.randint(0, 4, (33,), generator=g)]
    owners = _owners(15, 33, g)
    actual = retrieval_recalls(image, text, owners)
    _assert_equal_metrics(actual, reference_recalls(image, text, owners))


def test_constant_features_score_chance_not_perfect():
    image, text = torch.ones(20, 4) / 2, torch.ones(20, 4) / 2
    metrics = retrieval_recalls(image, text, torch.arange(20))
    for k in RECALL_KS:
        assert metrics[f"image_retrieval_recall@{k}"] == 0.0
        assert metrics[f"text_retrieval_recall@{k}"] == 0.0


def test_nan_features_never_hit():
    image = F.normalize(torch.randn(6, 4), dim=-1)
    text = image.clone()
    text[2] = float("nan")
    image[4] = float("nan")
    owners = torch.arange(6)
    metrics = retrieval_recalls(image, text, owners, ks=(1,))
    _assert_equal_metrics(metrics, reference_recalls(image, text, owners, ks=(1,)))
    assert metrics["image_retrieval_recall@1"] == pytest.approx(4 / 6)


def test_blocks_give_the_same_answer(monkeypatch):
    g = torch.Generator().manual_seed(5)
    image = F.normalize(torch.randn(9, 8, generator=g), dim=-1)
    text = F.normalize(torch.randn(25, 8, generator=g), dim=-1)
    owners = _owners(9, 25, g)
    whole = retrieval_recalls(image, text, owners)
    monkeypatch.setattr("tinyclip_fast.data.retrieval.QUERY_BLOCK", 4)
    _assert_equal_metrics(retrieval_recalls(image, text, owners), whole)


def test_image_without_caption_is_an_error():
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval_recalls(torch.randn(3, 4), torch.randn(2, 4), torch.tensor([0, 2]))


def _model():
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 32,
            "patch_size": 8,
            "width": 32,
            "layers": 1,
            "head_width": 16,
        },
        "text_cfg": {**TEXT, "width": 32, "heads": 2, "layers": 1},
    }
    return open_clip.model.CLIP(**cfg)


def test_evaluator_on_open_clip_matches_the_reference():
    model = _model().train()
    tokenizer = WordTokenizer(TEXT["context_length"], TEXT["vocab_size"])
    images = torch.randn(7, 3, 32, 32)
    captions = [f"caption {i} of image {i % 7}" for i in range(16)]
    owners = [i % 7 for i in range(16)]
    evaluator = RetrievalEvaluator(images, captions, owners, tokenizer, batch_size=3)
    metrics = evaluator(model)
    assert model.training
    with torch.no_grad():
        model.eval()
        image = F.normalize(model.encode_image(images).double(), dim=-1)
        text = F.normalize(model.encode_text(tokenizer(captions)).double(), dim=-1)
    expected = reference_recalls(image, text, torch.tensor(owners))
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key


def test_evaluator_rejects_bad_indices():
    with pytest.raises(ValueError, match="one image index per caption"):
        RetrievalEvaluator(torch.randn(2, 3, 8, 8), ["a", "b"], [0], WordTokenizer())
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        RetrievalEvaluator(torch.randn(2, 3, 8, 8), ["a", "b"], [0, 2], WordTokenizer())


def _write_pairs(folder, rows, separator=","):
    for name in {image for image, _ in rows}:
        random_image(len(name)).save(folder / name)
    lines = [f"filepath{separator}title"] + [f"{i}{separator}{c}" for i, c in rows]
    path = folder / ("pairs.csv" if separator == "," else "pairs.tsv")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_pairs_csv_with_several_captions_per_image(tmp_path):
    rows = [("b.png", "a bee"), ("a.png", "an ant"), ("b.png", "two bees"), ("cc.png", "cat")]
    path = _write_pairs(tmp_path, rows)
    preprocess = open_clip.image_transform(32, is_train=False)
    images, captions, owners = load_retrieval_pairs(path, preprocess)
    assert [p.name for p in images.paths] == ["b.png", "a.png", "cc.png"]
    assert captions == ["a bee", "an ant", "two bees", "cat"]
    assert owners == [0, 1, 0, 2]
    assert images[2]["image"].shape == (3, 32, 32)
    evaluator = RetrievalEvaluator(images, captions, owners, WordTokenizer(), batch_size=2)
    metrics = evaluator(_model())
    assert set(metrics) == {
        f"{kind}_retrieval_recall@{k}" for kind in ("image", "text") for k in RECALL_KS
    }
    assert metrics["text_retrieval_recall@5"] == 1.0  # three images: every one within top 5


def test_pairs_tsv_and_custom_columns(tmp_path):
    path = _write_pairs(tmp_path, [("x.png", "one")], separator="\t")
    text = path.read_text().replace("filepath\ttitle", "img\tcaption")
    path.write_text(text)
    images, captions, owners = load_retrieval_pairs(
        path, lambda image: image, img_key="img", caption_key="caption"
    )
    assert len(images) == 1 and captions == ["one"] and owners == [0]


def test_pairs_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_retrieval_pairs(tmp_path / "none.csv", lambda image: image)
    (tmp_path / "cols.csv").write_text("path,text\nx.png,hello\n")
    with pytest.raises(ValueError, match="no column 'filepath'"):
        load_retrieval_pairs(tmp_path / "cols.csv", lambda image: image)
    (tmp_path / "empty.csv").write_text("filepath,title\n")
    with pytest.raises(ValueError, match="no rows"):
        load_retrieval_pairs(tmp_path / "empty.csv", lambda image: image)
