"""The loader's finiteness check (util.lazy_init._check_finite) looks at every element, chunk by chunk."""

from __future__ import annotations

import pytest
import torch

from util.lazy_init import _check_finite


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 5, 22], ids=["first-chunk", "middle-chunk", "last-element"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_nan_or_inf_anywhere_is_found(bad, where, dtype):
    t = torch.randn(23, dtype=dtype)
    _check_finite("w", t, chunk=4)  # finite: no error
    t[where] = bad
    with pytest.raises(ValueError, match=r"'w' holds NaN or Inf"):
        _check_finite("w", t, chunk=4)


def test_integer_tensors_are_not_checked():
    _check_finite("codes", torch.full((9,), 255, dtype=torch.uint8), chunk=4)
