"""The ``dequant`` stage: quantized checkpoints (FP8 blocks and channels, MXFP4, GPTQ, AWQ,
compressed-tensors) analysed as the weights they encode, never as raw codes.

:func:`~esdtool.dequant.scheme.read_scheme` reads config.json's ``quantization_config``;
:func:`~esdtool.dequant.layout.layout_of` finds, from headers alone, which tensors make up which
weight; :meth:`QuantizedWeight.decode` turns the parts into the float32 weight
(:mod:`esdtool.dequant.formats` holds the arithmetic of each format).
"""

from typing import TYPE_CHECKING

from esdtool._lazy import lazy_getattr

if TYPE_CHECKING:
    from esdtool.dequant.layout import layout_of
    from esdtool.dequant.records import Layout, Note, QuantizedWeight
    from esdtool.dequant.scheme import Scheme, read_scheme

_WHERE = {"Layout": "records", "Note": "records", "QuantizedWeight": "records",
          "layout_of": "layout", "Scheme": "scheme", "read_scheme": "scheme"}  # fmt: skip
__all__ = ["Layout", "Note", "QuantizedWeight", "Scheme", "layout_of", "read_scheme"]
__getattr__ = lazy_getattr(__name__, _WHERE)
