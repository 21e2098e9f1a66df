"""excb: ExCB self-supervised pretraining on Ray (see README.md and docs/architecture.md)."""
