"""The run's loss: the sigmoid objective against the float64 formula, the softmax one as
before."""

import math

import pytest
import torch
from support import rel_err, sigmoid_reference

from tinyclip_fast.losses import AffinityMimickingLoss
from tinyclip_fast.ops.backend import force_backend
from tinyclip_fast.train.config import LossConfig
from tinyclip_fast.train.objective import SigmoidDistillObjective, build_objective


def unit(n, d, generator):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=-1)


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_sigmoid_objective_equals_the_formula_with_gradients(weight):
    g = torch.Generator().manual_seed(5)
    image, text = unit(13, 24, g).requires_grad_(), unit(13, 24, g).requires_grad_()
    scale = torch.tensor(math.exp(2.1)).requires_grad_()
    bias = torch.tensor(-3.5).requires_grad_()
    teachers = [
        (unit(13, 32, g), unit(13, 32, g), torch.tensor(20.0), torch.tensor(-6.0)),
        (unit(13, 16, g), unit(13, 16, g), torch.tensor(9.0), torch.tensor(-2.0)),
    ]
    objective = build_objective(LossConfig(family="sigmoid", contrastive_weight=weight))
    assert isinstance(objective, SigmoidDistillObjective)
    with force_backend("torch"):
        loss = objective(image, text, scale, bias, *map(list, zip(*teachers, strict=True)))
    loss.backward()
    leaves = [image, text, scale, bias]
    ours = [leaf.grad.clone() for leaf in leaves]
    for leaf in leaves:
        leaf.grad = None
    expected = sigmoid_reference(image, text, scale, bias, teachers, contrastive_weight=weight)
    expected.backward()
    assert rel_err(loss, expected) < 1e-5
    for got, leaf in zip(ours, leaves, strict=True):
        assert rel_err(got, leaf.grad) < 1e-4
    assert float(ours[3]) != 0.0  # the student's bias learns


def test_kinds_and_families():
    assert isinstance(build_objective(LossConfig()), AffinityMimickingLoss)
    assert build_objective(LossConfig(family="sigmoid", kind="kl")).loss.kind == "kl"
    assert build_objective(LossConfig(family="sigmoid")).loss.kind == "bce"
    with pytest.raises(ValueError, match="kind must be one of"):
        SigmoidDistillObjective(kind="hinge")
