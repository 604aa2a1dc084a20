"""The argument checks shared by the loss ops: errors name the argument; a device scalar
is read only when asked (reading a CUDA value syncs with the host)."""

import pytest
import torch

from tinyclip_fast.ops.arguments import (
    as_list,
    check_features,
    check_on_device,
    scalar_argument,
)


def test_check_features_names_what_is_wrong():
    x = torch.randn(3, 5)
    assert check_features("x", x) is x
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        check_features("x", [[1.0]])
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got dtype"):
        check_features("x", torch.ones(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x must be 2-D \[batch, dim\], got shape \(15,\)"):
        check_features("x", x.reshape(-1))
    with pytest.raises(ValueError, match=r"x must be non-empty, got shape \(0, 5\)"):
        check_features("x", x[:0])


def test_scalar_argument_reads_numbers_and_never_tensors():
    assert scalar_argument("s", 2.5) == 2.5
    for tensor in (torch.tensor([3.0]), torch.empty((), device="meta")):
        assert scalar_argument("s", tensor) is tensor
    for bad, error, message in (
        (True, TypeError, "s must be a float or a 0-d tensor, got bool"),
        ("2", TypeError, "s must be a float or a 0-d tensor, got str"),
        (torch.tensor(2), TypeError, "s must be a floating-point tensor"),
        (torch.ones(2), ValueError, r"s must be a scalar \(0-d tensor\), got shape \(2,\)"),
    ):
        with pytest.raises(error, match=message):
            scalar_argument("s", bad)


def test_check_on_device_raises_on_the_cpu_at_once():
    check_on_device(torch.tensor(True), "never raised")
    with pytest.raises(ValueError, match="s must be positive"):
        check_on_device(torch.tensor(-1.0) > 0, "s must be positive")


def test_as_list_says_whether_a_list_was_given():
    t = torch.zeros(1)
    assert as_list(t) == ([t], False)
    assert as_list((t, t)) == ([t, t], True)
