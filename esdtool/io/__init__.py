"""Files in and out: resolving a SOURCE to safetensors files, reading them one tensor at a time,
the parquet metrics table, and atomic writes."""
