"""The mathematics of the three GIM backward rules, on bare tensors.

Nothing here knows about models: each function leaves the forward value exactly
as it was and only changes what the backward pass sends to its input. All rule
arithmetic runs in float32 (float64 for float64 inputs) and the gradients are
cast back to the input dtype.

- :mod:`~captum_gim.rules.softmax`: rule 1, the tempered softmax backward;
- :mod:`~captum_gim.rules.attention`: rule 1 inside ``softmax(q k^T) v``,
  blockwise or from fused kernels;
- :mod:`~captum_gim.rules.norms`: rule 2, frozen normalization statistics;
- :mod:`~captum_gim.rules.scaling`: rule 3, gradient scales.
"""

from captum_gim.rules.attention import (
    blockwise_attention_backward,
    sdpa_attention_backward,
    tempered_attention_backward,
)
from captum_gim.rules.norms import frozen_group_norm, frozen_layer_norm, frozen_rms_norm
from captum_gim.rules.precision import rule_dtype
from captum_gim.rules.scaling import Lazy, lazy_scale_gradient, scale_gradient
from captum_gim.rules.softmax import tempered_softmax, tempered_softmax_backward

__all__ = [
    "Lazy",
    "blockwise_attention_backward",
    "frozen_group_norm",
    "frozen_layer_norm",
    "frozen_rms_norm",
    "lazy_scale_gradient",
    "rule_dtype",
    "scale_gradient",
    "sdpa_attention_backward",
    "tempered_attention_backward",
    "tempered_softmax",
    "tempered_softmax_backward",
]
