"""Sites grouped the way people read a transformer: by block (one encoder/decoder layer), then by
the part of the block (attention Q/K/V/O, FFN in/out), as in the movement pruning paper's Figure 6.

Module names of BERT, DistilBERT, GPT-2, Llama, T5, ViT and torch.nn.TransformerEncoder are
recognised; any other site is grouped by its module path (the parent module, then the layer).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# (pattern on the module path after the block, part); the first that matches names the part
_PARTS: list[tuple[str, str]] = [
    # fused projections: GPT-2's c_attn, torch.nn.MultiheadAttention's in_proj, Bloom/Falcon's qkv
    (r"(^|\.)(c_attn|in_proj|query_key_value|qkv(_proj)?|Wqkv)(\.|$)", "attention QKV"),
    # cross-attention of T5's decoder and BART-style decoders, before the self-attention rules
    (r"(^|\.)(EncDecAttention|encoder_attn|crossattention)\.(q|query|q_proj)(\.|$)", "cross-attention Q"),
    (r"(^|\.)(EncDecAttention|encoder_attn|crossattention)\.(k|key|k_proj)(\.|$)", "cross-attention K"),
    (r"(^|\.)(EncDecAttention|encoder_attn|crossattention)\.(v|value|v_proj)(\.|$)", "cross-attention V"),
    (r"(^|\.)(EncDecAttention|encoder_attn|crossattention)\.(o|out_proj|output\.dense)(\.|$)", "cross-attention O"),
    (r"(^|\.)(query|q_proj|q_lin|q)(\.|$)", "attention Q"),
    (r"(^|\.)(key|k_proj|k_lin|k)(\.|$)", "attention K"),
    (r"(^|\.)(value|v_proj|v_lin|v)(\.|$)", "attention V"),
    # attention output: BERT/ViT attention.output.dense, GPT-2 attn.c_proj, Llama o_proj,
    # DistilBERT out_lin, torch out_proj, T5 SelfAttention.o
    (r"(^|\.)(attention\.output\.dense|attn\.c_proj|o_proj|out_lin|out_proj|(Self)?Attention\.o)(\.|$)",
     "attention O"),
    (r"(^|\.)(gate_proj|wi_0|w1)(\.|$)", "FFN gate"),
    # FFN in: BERT/ViT intermediate.dense, GPT-2 mlp.c_fc, Llama up_proj, DistilBERT ffn.lin1,
    # T5 DenseReluDense.wi / wi_1, torch linear1
    (r"(^|\.)(intermediate\.dense|mlp\.c_fc|up_proj|ffn\.lin1|wi_1|DenseReluDense\.wi|linear1|fc1|w3)(\.|$)",
     "FFN in"),
    # FFN out: BERT/ViT output.dense (not under attention), GPT-2 mlp.c_proj, Llama down_proj,
    # DistilBERT ffn.lin2, T5 wo, torch linear2
    (r"(^|\.)(output\.dense|mlp\.c_proj|down_proj|ffn\.lin2|wo|linear2|fc2|w2)(\.|$)", "FFN out"),
]
_ORDER = ["attention QKV", "attention Q", "attention K", "attention V", "attention O",
          "cross-attention Q", "cross-attention K", "cross-attention V", "cross-attention O",
          "FFN gate", "FFN in", "FFN out"]
# containers of repeated blocks: BERT/ViT/DistilBERT `layer`, Llama `layers`, GPT-2 `h`, T5 `block`
_BLOCK = re.compile(r"^(?P<block>(?:.*?\.)?(?:layer|layers|h|block|blocks|encoder_layers|decoder_layers)\.\d+)"
                    r"\.(?P<rest>.+)$")
_PARAMETER = re.compile(r"\.(weight|in_proj_weight)$")


@dataclass(frozen=True)
class Placed:
    """Where a site sits: its block (e.g. `bert.encoder.layer.3`) and its part in it."""

    block: str
    part: str
    transformer: bool     # the part is a recognised attention/FFN role (not just a module name)


def place(site: str) -> Placed:
    """The block and part of one site (a parameter name such as `bert.encoder.layer.0.attention.self.query.weight`)."""
    module = _PARAMETER.sub(lambda m: ".in_proj" if m.group(1) == "in_proj_weight" else "", site)
    found = _BLOCK.match(module)
    if found is not None:
        rest = found.group("rest")
        for pattern, part in _PARTS:
            if re.search(pattern, rest):
                return Placed(found.group("block"), part, True)
        return Placed(found.group("block"), rest, False)
    parent, _, name = module.rpartition(".")
    return Placed(parent or "(top level)", name or module, False)


@dataclass
class Group:
    """One block's sites, in the order of `_ORDER` (recognised parts) then by name."""

    block: str
    layers: list[tuple[str, dict[str, Any]]]   # (part, the report's layer record)


def group_layers(layers: list[dict[str, Any]]) -> list[Group]:
    """The report's layer records grouped by block, blocks in the order their first site appears
    (numbered blocks in numeric order), parts in the order Q, K, V, O, FFN in, FFN out."""
    groups: dict[str, Group] = {}
    for layer in layers:
        placed = place(str(layer.get("site", "")))
        groups.setdefault(placed.block, Group(placed.block, [])).layers.append((placed.part, layer))
    for group in groups.values():
        group.layers.sort(key=lambda item: (_ORDER.index(item[0]) if item[0] in _ORDER else len(_ORDER),
                                            item[0]))
    return sorted(groups.values(), key=lambda g: _numeric_key(g.block))


def _numeric_key(name: str) -> list[Any]:
    """`encoder.block.10` after `encoder.block.9`; the text parts compared as text."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split(".")]


def is_transformer(groups: list[Group]) -> bool:
    return any(place(str(layer.get("site", ""))).transformer for g in groups for _, layer in g.layers)
