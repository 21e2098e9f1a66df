"""Running a pretraining on Ray: the driver, the Train worker loop, scaling, checkpoints, sweeps and the benchmark."""
