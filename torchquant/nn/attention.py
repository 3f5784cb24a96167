"""QuantMultiheadAttention: nn.MultiheadAttention with its four projections as layers of their own.

nn.MultiheadAttention multiplies its packed `in_proj_weight` and `out_proj.weight` itself (torch.nn.functional
.multi_head_attention_forward), so no layer swap reaches them. Here the query, key, value and output projections are
the submodules `q_proj`, `k_proj`, `v_proj` and `out_proj` (QuantLinear, or nn.Linear where a model's conversion
leaves one float), each with its own input quantization, and the attention between them is torch's, as in
nn.MultiheadAttention: the same arguments, masks, outputs and attention weights."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from torchquant.nn.base import take_hooks
from torchquant.nn.linear import QuantLinear

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _additive_mask(mask, name: str, dtype: torch.dtype):
    """A boolean mask (True: not attended) as -inf / 0 of dtype; a float mask as it is (added to the scores)."""
    if mask is None or mask.is_floating_point():
        return mask
    if mask.dtype != torch.bool:
        raise TypeError(f"QuantMultiheadAttention: {name} must be a bool or float tensor, got {mask.dtype}")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def _one_more_key(mask):
    """mask with a column for a key appended to the sequence, attended."""
    return None if mask is None else F.pad(mask, (0, 1))


class QuantMultiheadAttention(nn.Module):
    """nn.MultiheadAttention(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first)
    whose projections are QuantLinear layers quantized per `config` (a QuantConfig or a preset name; default
    int8-dynamic), initialised like nn.MultiheadAttention's. forward takes and returns what nn.MultiheadAttention's
    does. `from_float` makes one from an nn.MultiheadAttention (as prepare() does) with nn.Linear projections, which
    prepare then quantizes like any other Linear."""

    # torch's transformer layers read these to choose their fused inference path, which multiplies a packed float
    # in-projection: there is none here (no in_proj_weight either), and the None bias keeps them on the path that
    # calls this module
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, config=None, *, device=None, dtype=None):
        super().__init__()
        float_attention = nn.MultiheadAttention(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim,
                                                vdim, batch_first, device=device, dtype=dtype)
        self._take(float_attention)
        for name in PROJECTIONS:
            setattr(self, name, QuantLinear.from_float(getattr(self, name), config))

    @classmethod
    def from_float(cls, attention: nn.MultiheadAttention) -> "QuantMultiheadAttention":
        """The same attention with its projections as nn.Linear layers holding copies of its weights (the packed
        in_proj_weight is split into q_proj, k_proj and v_proj: new parameters, so an optimizer has to be made after
        the swap), taking over its forward and backward hooks."""
        if type(attention) is not nn.MultiheadAttention:
            raise TypeError(f"QuantMultiheadAttention.from_float: attention must be an nn.MultiheadAttention, got "
                            f"{type(attention).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._take(attention)
        take_hooks(layer, attention)
        return layer

    def _take(self, attention: nn.MultiheadAttention) -> None:
        """nn.Linear projections with copies of attention's weights and biases; its other settings and its
        bias_k / bias_v parameters (shared)."""
        self.embed_dim, self.kdim, self.vdim = attention.embed_dim, attention.kdim, attention.vdim
        self.num_heads, self.head_dim = attention.num_heads, attention.head_dim
        self.dropout, self.batch_first = attention.dropout, attention.batch_first
        self.add_zero_attn = attention.add_zero_attn
        e = self.embed_dim
        if attention._qkv_same_embed_dim:
            sources = (attention.in_proj_weight,) * 3
            weights = attention.in_proj_weight.detach().split(e)
        else:
            sources = weights = (attention.q_proj_weight, attention.k_proj_weight, attention.v_proj_weight)
        bias = attention.in_proj_bias
        biases = (None,) * 3 if bias is None else bias.detach().split(e)
        for name, source, weight, b in zip(PROJECTIONS, sources, weights, biases):
            layer = nn.Linear(weight.shape[1], e, b is not None, device="meta", dtype=weight.dtype)
            layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=source.requires_grad)
            if b is not None:
                layer.bias = nn.Parameter(b.clone(), requires_grad=bias.requires_grad)
            setattr(self, name, layer)
        out = attention.out_proj
        self.out_proj = nn.Linear(e, e, out.bias is not None, device="meta", dtype=out.weight.dtype)
        self.out_proj.weight = out.weight
        self.out_proj.bias = out.bias
        self.bias_k, self.bias_v = attention.bias_k, attention.bias_v
        self.train(attention.training)
        self.register_load_state_dict_pre_hook(QuantMultiheadAttention._float_names_loaded)

    def _float_names_loaded(self, state_dict, prefix, *args) -> None:
        """A float nn.MultiheadAttention's state dict loads too: its packed in_proj_weight and in_proj_bias (or
        q_proj_weight & co.) become the projections' weights and biases (so a float checkpoint loads into a prepared
        model)."""
        e = self.embed_dim
        for kind in ("weight", "bias"):
            packed = state_dict.pop(f"{prefix}in_proj_{kind}", None)
            if packed is not None and packed.shape[0] == 3 * e:
                state_dict.update({f"{prefix}{name}.{kind}": part for name, part in zip(PROJECTIONS, packed.split(e))})
            elif packed is not None:  # (left for the load to report)
                state_dict[f"{prefix}in_proj_{kind}"] = packed
        for name in PROJECTIONS[:3]:
            weight = state_dict.pop(f"{prefix}{name}_weight", None)
            if weight is not None:
                state_dict[f"{prefix}{name}.weight"] = weight

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}")

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        """Whether the inputs are batched; raises ValueError where nn.MultiheadAttention would refuse them."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"QuantMultiheadAttention: {name} must be a tensor, got {type(t).__name__}")
        if query.dim() not in (2, 3):
            raise ValueError(f"QuantMultiheadAttention: query must be 3-D (batched) or 2-D (unbatched), got shape "
                             f"{list(query.shape)}")
        batched = query.dim() == 3
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"QuantMultiheadAttention: key and value must be {query.dim()}-D like query, got shapes "
                             f"{list(key.shape)} and {list(value.shape)}")
        batch_dim = (0 if self.batch_first else 1) if batched else None
        seq_dim = 1 - batch_dim if batched else 0
        for name, t, features in (("query", query, self.embed_dim), ("key", key, self.kdim),
                                  ("value", value, self.vdim)):
            if t.shape[-1] != features:
                raise ValueError(f"QuantMultiheadAttention: {name} must have {features} features in its last "
                                 f"dimension, got shape {list(t.shape)}")
        if key.shape[seq_dim] != value.shape[seq_dim] or (batched and not (
                query.shape[batch_dim] == key.shape[batch_dim] == value.shape[batch_dim])):
            raise ValueError(f"QuantMultiheadAttention: query, key and value must have one batch size and key and "
                             f"value one length, got shapes {list(query.shape)}, {list(key.shape)}, "
                             f"{list(value.shape)} (batch_first={self.batch_first})")
        n = query.shape[batch_dim] if batched else 1
        length, source = query.shape[seq_dim], key.shape[seq_dim]
        if key_padding_mask is not None:
            expected = (n, source) if batched else (source,)
            if tuple(key_padding_mask.shape) != expected:
                raise ValueError(f"QuantMultiheadAttention: key_padding_mask must have shape {list(expected)}, got "
                                 f"{list(key_padding_mask.shape)}")
        if attn_mask is not None and tuple(attn_mask.shape) not in ((length, source),
                                                                     (n * self.num_heads, length, source)):
            raise ValueError(f"QuantMultiheadAttention: attn_mask must have shape {[length, source]} or "
                             f"{[n * self.num_heads, length, source]}, got {list(attn_mask.shape)}")
        return batched

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        # computed batch first: [n, length, features]
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if is_causal and attn_mask is None:
            raise RuntimeError("QuantMultiheadAttention: is_causal is a hint that attn_mask is the causal mask and "
                               "needs attn_mask (nn.Transformer.generate_square_subsequent_mask makes one)")
        key_padding_mask = _additive_mask(key_padding_mask, "key_padding_mask", query.dtype)
        # without padding or weights to return, the hint alone reaches scaled_dot_product_attention (as in
        # nn.MultiheadAttention); otherwise the mask is applied
        causal = is_causal and key_padding_mask is None and not need_weights
        attn_mask = None if causal else _additive_mask(attn_mask, "attn_mask", query.dtype)
        n, length, heads, head_dim = query.shape[0], query.shape[1], self.num_heads, self.head_dim
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if self.bias_k is not None:  # a learned key and value appended to the sequence
            k = torch.cat([k, self.bias_k.expand(n, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(n, 1, -1)], dim=1)
            attn_mask, key_padding_mask = _one_more_key(attn_mask), _one_more_key(key_padding_mask)
        q = q.view(n, length, heads, head_dim).transpose(1, 2)  # [n, heads, length, head_dim]
        k = k.view(n, k.shape[1], heads, head_dim).transpose(1, 2)  # (sizes, not -1: n or the length may be 0)
        v = v.view(n, v.shape[1], heads, head_dim).transpose(1, 2)
        if self.add_zero_attn:  # a zero key and value appended
            k = torch.cat([k, k.new_zeros(n, heads, 1, head_dim)], dim=2)
            v = torch.cat([v, v.new_zeros(n, heads, 1, head_dim)], dim=2)
            attn_mask, key_padding_mask = _one_more_key(attn_mask), _one_more_key(key_padding_mask)
        source = k.shape[2]
        mask = None  # [n or 1, heads or 1, length, source], added to the scores
        if attn_mask is not None:
            mask = attn_mask.view(n, heads, length, source) if attn_mask.dim() == 3 else attn_mask.view(
                1, 1, length, source)
        if key_padding_mask is not None:
            padding = key_padding_mask.view(n, 1, 1, source)
            mask = padding if mask is None else mask + padding
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = torch.matmul(q * math.sqrt(1.0 / head_dim), k.transpose(-2, -1))
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            if dropout > 0:
                weights = F.dropout(weights, dropout)
            out = torch.matmul(weights, v)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, mask, dropout, causal)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, self.embed_dim))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights
