"""A LoRA module's merged weight, computed the way PEFT's ``merge_and_unload`` computes it.

For a base weight W as stored and a module's factors A [r, in] and B [out, r] with scaling s:

- Linear: W + s B A (``(B A)^T`` for a ``fan_in_fan_out`` layer such as GPT-2's Conv1D, whose
  weight is stored [in, out]); the sum is taken in the wider of the two dtypes and stored in
  W's, as ``weight.data += delta`` does (peft.tuners.lora.layer.Linear.merge).
- Embedding: W + (B A)^T s, the update first cast to W's dtype (Embedding.merge).
- DoRA: (m / ||W + s B A||) (W + s B A), the norm of each output row over the input dimension
  (peft.tuners.lora.dora.DoraLinearLayer.get_weight_norm: ``torch.linalg.norm(.., dim=1)`` of
  the weight in [out, in] layout, i.e. of the transposed stored weight for fan_in_fan_out and
  embeddings), m the trained magnitude vector (peft.tuners.lora.variants.DoraLinearVariant).

Each step is PEFT's own torch operation on tensors of the same dtypes and layouts, so on the
same kind of device the merged weight is PEFT's to the last bit (a GPU may round float32
products differently from a CPU, as PEFT's own merge there would). Factors in float16 or
bfloat16 on a CPU are multiplied in float32 and rounded back, as PEFT does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esdtool.adapters.layout import LowRankUpdate

_HALF = (torch.float16, torch.bfloat16)
_MATMUL = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Merge:
    """What one base tensor becomes under an adapter.

    update:         a LoRA module's update, added (and DoRA-rescaled) to the base weight.
    saved:          a ``modules_to_save`` tensor of the adapter, read in place of the base one.
    fan_in_fan_out: the base weight is stored [in, out] (adapter_config.json's flag).
    """

    update: LowRankUpdate | None = None
    saved: str | None = None
    fan_in_fan_out: bool = False

    def parts(self) -> list[tuple[str, str]]:
        """(role, adapter tensor name) of everything the merge reads from the adapter."""
        if self.saved is not None:
            return [("saved", self.saved)]
        assert self.update is not None
        return self.update.merge_parts()


def merged_weight(
    weight: torch.Tensor, factors: dict[str, torch.Tensor], merge: Merge
) -> torch.Tensor:
    """The merged weight of ``weight`` (as stored) under ``merge``'s update, in ``weight``'s
    dtype, from ``factors`` ("A", "B" and, for DoRA, "magnitude") on ``weight``'s device."""
    update = merge.update
    assert update is not None
    flip = update.embedding or merge.fan_in_fan_out  # stored [in, out]: PEFT's transpose
    delta = _delta(factors["A"], factors["B"], update.scaling, flip, update.embedding)
    if update.magnitude is None:
        if update.embedding:
            return weight + delta.to(weight.dtype)
        return (weight + delta).to(weight.dtype)
    rows = (weight.T + delta.T) if flip else (weight + delta)  # [out, in], as PEFT takes it
    norm = torch.linalg.norm(rows, dim=1).to(rows.dtype)  # per output row, over the inputs
    factor = factors["magnitude"] / norm
    factor = factor.view(-1, 1).T if flip else factor.view(-1, 1)
    return (factor * (weight + delta)).to(weight.dtype)


def _delta(
    A: torch.Tensor, B: torch.Tensor, scaling: float, flip: bool, embedding: bool
) -> torch.Tensor:
    """PEFT's ``get_delta_weight``: ``transpose(B @ A, flip) * scaling``, half-precision
    factors on a CPU multiplied in float32 and rounded back (the dtype PEFT checks is lora_B's
    for a linear layer, lora_embedding_A's for an embedding)."""
    dtype = A.dtype if embedding else B.dtype
    cast = B.device.type == "cpu" and dtype in _HALF
    if cast or A.dtype not in _MATMUL or B.dtype not in _MATMUL:  # FP8 has no matmul
        A, B = A.float(), B.float()
    product = B @ A
    out = (product.T if flip else product) * scaling
    return out.to(dtype) if cast else out
