"""Data: video I/O, shards, data modules, synthetic data and dataset converters."""
