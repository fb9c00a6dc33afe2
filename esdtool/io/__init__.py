"""Files in and out: resolving a SOURCE to safetensors files, reading them one tensor at a time
(a hub id's as they arrive), the parquet metrics table, and atomic writes."""
