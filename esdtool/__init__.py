"""esdtool: eigenvalue spectra of weight matrices, turned into LoRA rank plans.

The library surface is small on purpose:

- :func:`analyze` reads a checkpoint tensor by tensor and writes a parquet metrics table;
- :func:`load_metrics` reads such a table back, validated.
"""

__version__ = "0.1.0"

from esdtool.analyze import AnalyzeResult, AnalyzeSettings, analyze
from esdtool.table import SCHEMA_VERSION, load_metrics

__all__ = [
    "SCHEMA_VERSION",
    "AnalyzeResult",
    "AnalyzeSettings",
    "__version__",
    "analyze",
    "load_metrics",
]
