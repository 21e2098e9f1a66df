"""Judging a pretraining: features, kNN and linear probes, clustering metrics, export and report plots."""
