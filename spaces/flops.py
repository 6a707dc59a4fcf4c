"""Cross-checks of the analytic FLOPs count against two independent counters.

The analytic count in each block is the source of truth; these counters exist so a test
can prove it. Both are made to count the same op set as the analytic convention
(matrix products only, multiply-add = 2):

* ``fvcore`` counts a multiply-add as 1 (so it is doubled) and also counts norms and a
  few element-wise ops by default: those handles are switched off here.
* ``torch.utils.flop_counter.FlopCounterMode`` does not see
  ``F.scaled_dot_product_attention`` on CPU unless the math backend is forced.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

# fvcore handles for element-wise / normalisation ops that the convention does not count.
_FVCORE_IGNORED = (
    "aten::layer_norm",
    "aten::group_norm",
    "aten::batch_norm",
    "aten::instance_norm",
    "aten::upsample_nearest2d",
    "aten::upsample_bilinear2d",
    "aten::adaptive_avg_pool2d",
    "aten::grid_sampler",
)


def _zero(inputs: list[Any], outputs: list[Any]) -> int:
    return 0


def _sdpa_fvcore_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle for aten::scaled_dot_product_attention, in multiply-adds."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    *batch, t_q, d_k = q
    t_k = k[-2]
    d_v = v[-1]
    n = 1
    for b in batch:
        n *= b
    return int(n * t_q * t_k * (d_k + d_v))


def fvcore_flops(module: nn.Module, inputs: Sequence[torch.Tensor]) -> int:
    """Matmul FLOPs of ``module(*inputs)`` by fvcore, converted to multiply-add = 2."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(module, tuple(inputs))
        # a handle of None only silences the warning; a zero handle stops the count
        analysis.set_op_handle(**{name: _zero for name in _FVCORE_IGNORED})
        analysis.set_op_handle(
            **{"aten::scaled_dot_product_attention": _sdpa_fvcore_handle}
        )
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return 2 * int(analysis.total())


def torch_flops(module: nn.Module, inputs: Sequence[torch.Tensor]) -> int:
    """Matmul FLOPs of ``module(*inputs)`` by ``FlopCounterMode`` (multiply-add = 2)."""
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter, torch.no_grad():
        module(*inputs)
    return int(counter.get_total_flops())
