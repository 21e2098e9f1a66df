"""The run directory and its files: checkpoints (written atomically, verified on load), metrics, summary and
config, on local disk or object storage."""
