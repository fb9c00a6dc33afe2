"""What a tensor is for, from its name: the ``role`` and ``layer`` columns (method.md section 1).

Roles: ``linear`` (a projection inside a transformer block: the default allocation
targets), ``embedding``, ``lm_head``, ``expert`` (3-D fused experts or names under
``.experts.``), ``conv`` (4-D kernels) and ``other`` (everything else, e.g. a pooler).
"""

from __future__ import annotations

import re

# A block index: "layers.3.", "layer.3.", "h.3.", "blocks.3.", "block.3." (HF naming families).
_BLOCK = re.compile(r"(?:^|\.)(?:layers?|h|blocks?|decoder\.layers?|encoder\.layers?)\.(\d+)\.")
_EMBED = re.compile(
    r"(?:^|\.)(?:embed_tokens|wte|wpe|word_embeddings|position_embeddings|"
    r"token_type_embeddings|embeddings?|embed_positions|tok_embeddings)(?:\.|$)"
)
_LM_HEAD = re.compile(r"(?:^|\.)(?:lm_head|embed_out|output)\.weight$")


def block_index(name: str) -> int | None:
    """The transformer block a tensor belongs to, or None outside the blocks."""
    m = _BLOCK.search(name)
    if m is None or len(m.group(1)) > 18:  # "layers.99999999999999999999." fits no int64
        return None
    return int(m.group(1))


def block_key(name: str) -> str | None:
    """The block a module belongs to, named by its path ("model.encoder.layers.0": an encoder's
    and a decoder's layer 0 are two blocks), or None outside the blocks."""
    m = _BLOCK.search(name)
    if m is None or len(m.group(1)) > 18:
        return None
    return name[: m.end() - 1]


def infer_role(name: str, ndim: int) -> str:
    """The role of tensor ``name`` with ``ndim`` dimensions (see the module docstring)."""
    if ndim == 4:
        return "conv"
    if ndim == 3 or ".experts." in name:
        return "expert"
    if _LM_HEAD.search(name) and block_index(name) is None:
        return "lm_head"
    if _EMBED.search(name):
        return "embedding"
    if block_index(name) is not None and ndim == 2:
        return "linear"
    return "other"


def module_kind(name: str) -> str | None:
    """What a block module does, shared across depth: the module name after its block index
    ("model.layers.3.self_attn.q_proj" -> "self_attn.q_proj"); None outside the blocks."""
    m = _BLOCK.search(name)
    # Experts stored one tensor each ("mlp.experts.17.down_proj") share one kind across experts.
    if m is None:
        return None
    return re.sub(r"(^|\.)experts\.\d+\.", r"\1experts.*.", module_name(name[m.end() :]))


def module_name(name: str) -> str:
    """The PEFT module name of a weight tensor: its name without the trailing ``.weight``."""
    return name[: -len(".weight")] if name.endswith(".weight") else name
