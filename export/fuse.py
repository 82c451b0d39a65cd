"""Graphs ONNX Runtime can fuse: every attention as one ``com.microsoft.Attention`` node.

open_clip's packed in-projection, exported as is, becomes Transpose/Reshape/Slice/Squeeze/
Gather chains that match none of ONNX Runtime's fusion patterns (DESIGN §6). Here, on the
exporter's private copy of the model, each self-attention — the backbone's
``nn.MultiheadAttention`` and every HarMA ``AdapterAttention`` — is routed through one custom
op, ``harma_onnx::attention``, whose PyTorch body is the reference formula and whose ONNX
translation is the contrib op ``com.microsoft.Attention``: input ``(B, L, C)``, packed weight
``[C, 3C]`` = ``in_proj_weightᵀ`` (stored pre-transposed, so no Transpose at run time), bias
``[3C]``, ``num_heads``; causal text attention is its ``unidirectional=1``.

:func:`fold_initializer_transposes` then stores every ``Transpose(initializer)`` left in the
graph (the ``F.linear`` weights: the exporter does not fold tensors above its size limit) as
an initializer already transposed, so MatMuls see constant weights — which is also what lets
dynamic quantization quantize them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import AdapterAttention

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------
# the op: reference body (traced and used for parity) and ONNX translation
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("harma_onnx::attention", mutates_args=())
def attention(x: Tensor, weight_t: Tensor, bias: Tensor, heads: int, causal: bool) -> Tensor:
    """``softmax(q kᵀ / √d [+ causal mask]) v`` with ``[q|k|v] = x W + b``; ``x`` (N, L, C_in), ``W`` (C_in, 3C).

    Returns (N, L, C). The input width may differ from the attention's (``com.microsoft.Attention``
    allows it): the adapter folding of :mod:`harma_fast.export.fold` feeds one attention's output,
    or two of them side by side, straight into the next attention through a composed weight.
    """
    return attention_math(x, weight_t, bias, heads, causal)


def attention_math(x: Tensor, weight_t: Tensor, bias: Tensor, heads: int, causal: bool = False) -> Tensor:
    """The body of :func:`attention` in standard ops (what a ``--plain-onnx`` export traces)."""
    n, length, c_in = x.shape
    c = weight_t.shape[1] // 3
    hd = c // heads
    qkv = (x.reshape(n * length, c_in) @ weight_t + bias).reshape(n, length, 3, heads, hd)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each N, H, L, hd
    scores = torch.matmul(q * hd ** -0.5, k.transpose(-1, -2))
    if causal:
        future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return torch.matmul(scores.softmax(-1), v).transpose(1, 2).reshape(n, length, c)


@attention.register_fake
def _(x, weight_t, bias, heads, causal):
    return x.new_empty(*x.shape[:-1], weight_t.shape[1] // 3)


def _attention_schema():
    """The part of ``com.microsoft.Attention``'s signature we use (onnx's registry lacks contrib ops)."""
    from onnx.defs import OpSchema

    param = OpSchema.FormalParameter
    return OpSchema(
        "Attention", "com.microsoft", 1,
        inputs=[param("input", "T"), param("weights", "T"), param("bias", "T")], outputs=[param("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "")],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "", required=True),
                    OpSchema.Attribute("unidirectional", OpSchema.AttrType.INT, "", required=False)])


def _attention_onnx(x, weight_t, bias, heads: int, causal: bool):
    import onnxscript

    fused = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "Attention", _attention_schema())
    return fused(x, weight_t, bias, num_heads=heads, unidirectional=int(causal))


def translation_table() -> dict:
    """For ``torch.onnx.export(custom_translation_table=...)``."""
    return {torch.ops.harma_onnx.attention.default: _attention_onnx}


# --------------------------------------------------------------------------------------------
# module swaps on the exporter's private copy
# --------------------------------------------------------------------------------------------
def _packed_transposed(module: nn.Module) -> None:
    module.register_buffer("in_proj_weight_t", module.in_proj_weight.detach().t().contiguous(), persistent=False)


class FusedMultiheadAttention(nn.MultiheadAttention):
    """A backbone block's self-attention through the fused op (same parameters, same result)."""

    harma_causal: bool = False

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None, **kw):
        # Anything but plain self-attention (optionally with the model's causal mask, which
        # ``fuse_attention`` verified) keeps the stock path.
        if (query is not key or key is not value or key_padding_mask is not None
                or (attn_mask is not None and not self.harma_causal)):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, **kw)
        x = query if self.batch_first else query.transpose(0, 1)
        y = attention(x, self.in_proj_weight_t, self.in_proj_bias, self.num_heads, attn_mask is not None)
        y = F.linear(y, self.out_proj.weight, self.out_proj.bias)
        return (y if self.batch_first else y.transpose(0, 1)), None


class FusedAdapterAttention(AdapterAttention):
    def forward(self, x: Tensor, seq_first: bool = False) -> Tensor:
        x = x.transpose(0, 1) if seq_first else x
        y = F.linear(attention(x, self.in_proj_weight_t, self.in_proj_bias, self.heads, False),
                     self.out_proj.weight, self.out_proj.bias)
        return y.transpose(0, 1) if seq_first else y


def _is_causal_mask(mask: Optional[Tensor]) -> bool:
    if mask is None or mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        return False
    future = torch.ones_like(mask, dtype=torch.bool).triu(1)
    return bool(torch.isneginf(mask[future]).all() and (mask[~future] == 0).all())


def fuse_attention(model: nn.Module) -> int:
    """Route every self-attention of ``model`` (in place) through :func:`attention`; returns how many.

    Backbone attentions of open_clip's SDPA ``Attention`` blocks, and text towers whose mask is
    not the plain causal mask, stay as they are (exported with standard ops).
    """
    from ..patching import find_towers

    towers = find_towers(model)
    text_owner = model.text if hasattr(model, "text") and hasattr(model.text, "attn_mask") else model
    causal_text = _is_causal_mask(getattr(text_owner, "attn_mask", None))
    count = 0
    for name, tower in towers.items():
        for block in tower.blocks:
            attn = getattr(block, "attn", None)  # timm/HF blocks keep their own attention (not an MHA)
            if type(attn) is nn.MultiheadAttention and attn._qkv_same_embed_dim and attn.in_proj_bias is not None:
                if name == "text" and not causal_text:
                    continue
                attn.__class__ = FusedMultiheadAttention
                attn.harma_causal = name == "text"
                _packed_transposed(attn)
                count += 1
    for module in model.modules():
        if type(module) is AdapterAttention:  # shared sub-adapters are reached once, via their owner
            module.__class__ = FusedAdapterAttention
            _packed_transposed(module)
            count += 1
    return count


# --------------------------------------------------------------------------------------------
# graph pass
# --------------------------------------------------------------------------------------------
def fold_initializer_transposes(model) -> int:
    """Replace every ``Transpose`` of an initializer by the transposed initializer (in place).

    ``model`` is an ``onnx.ModelProto``; returns the number of Transposes removed. An initializer
    read elsewhere too is kept; the transposed copy gets a name of its own.
    """
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    keep, folded = [], 0
    for node in graph.node:
        if node.op_type == "Transpose" and node.domain in ("", "ai.onnx") and node.input[0] in inits:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            array = numpy_helper.to_array(inits[node.input[0]])
            array = np.ascontiguousarray(np.transpose(array, perm) if perm else array.T)
            graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
            inits[node.output[0]] = graph.initializer[-1]
            folded += 1
        else:
            keep.append(node)
    if folded:
        del graph.node[:]
        graph.node.extend(keep)
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        unused = [t for t in graph.initializer if t.name not in used]
        for t in unused:
            graph.initializer.remove(t)
        names = {t.name for t in unused}
        kept_inputs = [i for i in graph.input if i.name not in names]
        del graph.input[:]
        graph.input.extend(kept_inputs)
        kept_info = [v for v in graph.value_info if v.name not in inits]
        del graph.value_info[:]
        graph.value_info.extend(kept_info)
    return folded
