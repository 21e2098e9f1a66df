"""A run directory written by hand (no Ray): the training state excb.run.worker writes after an epoch, with a teacher
whose weights and batch-norm statistics are perturbed away from their initial values."""

from __future__ import annotations

from typing import Any

import torch

from excb.config import ExcbConfig, load_config
from excb.method.learner import ExcbLearner
from excb.method.model import ExcbNetwork
from excb.run.worker import training_state
from excb.rundir.checkpoint import checkpoint_dir_name, write_state_dir
from excb.storage import join

SMALL_HEADS = ["model.projector_hidden=32", "model.projector_out=16", "model.predictor_hidden=32",
               "model.num_prototypes=12"]


def make_run(run_dir: str, overrides: list[str], *, epoch: int = 1,
             seed: int = 0) -> tuple[dict[str, Any], ExcbNetwork, ExcbConfig]:
    """Write ``RUN_DIR/checkpoint_epochNNNN`` for a config of ``overrides``; returns (state, teacher, cfg)."""
    cfg = load_config(None, [*SMALL_HEADS, *overrides])
    learner = ExcbLearner(cfg, steps_per_epoch=10)
    teacher = learner.teacher
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
        teacher.train()  # non-trivial batch-norm running statistics
        size = cfg.augment.global_size
        for _ in range(3):
            teacher.backbone(torch.randn(8, cfg.data.channels, size, size) * 2 + 0.5)
    teacher.eval()
    learner.global_step = 10 * epoch
    state = training_state(learner, epoch, [], cfg)
    write_state_dir(state, join(run_dir, checkpoint_dir_name(epoch)))
    return state, teacher, cfg
