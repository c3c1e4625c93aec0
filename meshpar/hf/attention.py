"""transformers' attention, routed through meshpar's attention core.

transformers' attention modules call the function registered under the model's
`config._attn_implementation` with q (b, h, s, d) and k, v (b, kv heads, s, d), after
the rotary embedding. meshpar registers one, "meshpar", that calls the module's
`attend(q, k, v)` - the causal core a Plan's `attention` names - so context parallelism
(ring or all-to-all attention) and selective recomputation replace it as they replace
meshpar's own model's. Until they do, `attend` is plain causal attention (PyTorch's
scaled_dot_product_attention, as transformers' "sdpa").

meshpar trains on packed sequences: every attention is causal over the whole sequence,
so no mask is built (the mask function registered beside the attention returns none) and
a padding mask that hides a token is refused.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IMPLEMENTATION = "meshpar"


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention with the default scale; grouped-query when k, v have fewer heads."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


def meshpar_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The attention function transformers calls: `module.attend(q, k, v)`, output as
    transformers expects it, (b, s, h, d)."""
    if attention_mask is not None:  # one a caller built whole (4-d) reaches here as it is
        raise ValueError("meshpar trains on packed sequences, causal over the whole sequence: call the model "
                         "without an attention_mask")
    if dropout:
        raise ValueError(f"attention dropout {dropout} is not supported by meshpar's attention core; set the "
                         f"config's attention_dropout to 0")
    if sliding_window is not None and query.shape[2] > sliding_window:
        raise ValueError(f"a sequence of {query.shape[2]} tokens exceeds the model's sliding window of "
                         f"{sliding_window}; meshpar's attention is causal over the whole sequence")
    default = 1 / math.sqrt(query.shape[-1])
    if scaling is not None and not math.isclose(scaling, default, rel_tol=1e-12):
        query = query * (scaling / default)  # the core scales by 1/sqrt(d)
    attend = getattr(module, "attend", causal_attention)
    return attend(query, key, value).transpose(1, 2).contiguous(), None


def no_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> None:
    """The mask transformers builds for "meshpar": none - attention is causal over the
    whole sequence; ValueError for a padding mask that hides a token."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("meshpar trains on packed sequences, causal over the whole sequence: call the model "
                         "without an attention_mask that hides tokens")
    return None


def register() -> None:
    """Make "meshpar" a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, meshpar_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, no_mask)
