"""Data parallelism is exact: 2 gloo ranks with batch B each train like 1 process with batch 2B.

Real DDP (gradient all-reduce), batch norm over the global batch (student and teacher) and the all-reduced size
estimate, through the same learner (``ExcbLearner``) the Ray worker steps. Views come from a deterministic view
function, so both set-ups see the very same crops of the very same images. The ×1.01 argmax boost is switched off
here: it is discontinuous, so a near-tie that float summation order resolves differently flips a target (measured: the loss
then drifts by ~1e-3 after 4 steps, against ~1e-5 without the boost). For the same reason the networks run NCHW
(``model.channels_last=false``): on a CPU, torch's channels-last BatchNorm computes its batch statistics less exactly
(max error 7e-6 against fp64 where the NCHW kernel has 4e-7, on N(3, 2²) inputs), the one-process run's BN then
differs from the two ranks' global BN at 1e-5, and a target flips by step 3 (loss off by 3e-3). DDP's arithmetic
does not depend on the layout; the NHWC networks' multi-worker runs are tested through Ray (test_scale_out).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from testkit.net import free_port
from torch import Tensor

from excb.config import ExcbConfig, load_config
from excb.data import load_fashion_mnist
from excb.method.learner import ExcbLearner
from excb.method.syncbn import GlobalBatchNorm, convert_global_batchnorm

B = 16  # per-rank batch
STEPS = 4


def _views(images: Tensor, crop_scale: float, gen: torch.Generator, valid_hw: Tensor | None = None) -> list[Tensor]:
    """Two global views (image, mirrored image) and two fixed local crops: no randomness."""
    x = (images.float() / 255 - 0.286) / 0.353
    return [x, x.flip(-1),
            F.interpolate(x[..., 2:18, 2:18], size=12, mode="bilinear", align_corners=False),
            F.interpolate(x[..., 10:26, 8:24], size=12, mode="bilinear", align_corners=False)]


def _cfg() -> ExcbConfig:
    return load_config(None, ["model.convnet_widths=[8,16]", "model.projector_hidden=32", "model.projector_out=16",
                              "model.predictor_hidden=32", "model.num_prototypes=24", "augment.num_local=2",
                              "train.epochs=1", f"train.batch_size={2 * B}", "optim.warmup_epochs=0",
                              "method.balance_momentum=0.5", "optim.lr=0.05", "method.argmax_boost=1.0",
                              "model.channels_last=false"])


def _images() -> Tensor:
    x, _ = load_fashion_mnist("test")
    return torch.from_numpy(x[: 2 * B * STEPS, None].copy())


def _train(rank: int, world: int) -> dict[str, object]:
    """STEPS steps; rank r of ``world`` takes its contiguous slice of each 2B-image batch."""
    cfg = _cfg()  # train.seed 0: every rank starts from the same weights
    wrap = torch.nn.parallel.DistributedDataParallel if world > 1 else None
    learner = ExcbLearner(cfg, steps_per_epoch=STEPS, global_batchnorm=world > 1, wrap_student=wrap)
    learner.augment = _views
    images, per = _images(), 2 * B // world
    losses = []
    for step in range(STEPS):
        batch = images[step * 2 * B:(step + 1) * 2 * B][rank * per:(rank + 1) * per]
        stats = learner.step(batch, 0, torch.Generator())
        losses.append(float(stats.loss))
    return {"losses": torch.tensor(losses), "student": learner.network.state_dict(),
            "teacher": learner.teacher.state_dict(), "sizes": learner.balancer.sizes.clone()}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(_train(rank, world), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_of_b_equal_one_process_of_2b(tmp_path) -> None:
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same summation order whatever earlier tests set
    try:
        ref = _train(0, 1)
    finally:
        torch.set_num_threads(threads)

    # the loss is a mean over samples, so the global loss is the mean of the ranks' losses
    torch.testing.assert_close((ranks[0]["losses"] + ranks[1]["losses"]) / 2, ref["losses"], atol=3e-5, rtol=1e-5)
    assert ref["losses"][-1] != ref["losses"][0]  # it trained
    for key in ("student", "teacher"):
        for name, value in ref[key].items():
            # identical on both ranks, and equal to the single process up to float summation order
            torch.testing.assert_close(ranks[0][key][name], ranks[1][key][name], atol=1e-6, rtol=1e-6, msg=name)
            # (float32 over 4 steps through batch norms: a different summation order moves weights ~1e-5 at
            # 1 thread; seen up to 2.5e-5 on predictor weights of ~0.2)
            torch.testing.assert_close(ranks[0][key][name], value, atol=5e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(ranks[0]["sizes"], ranks[1]["sizes"], atol=0, rtol=0)
    torch.testing.assert_close(ranks[0]["sizes"], ref["sizes"], atol=1e-6, rtol=0)


def test_global_batchnorm_without_a_group_is_batchnorm() -> None:
    bn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.BatchNorm1d(3))
    converted = convert_global_batchnorm(bn, "cpu")
    assert isinstance(converted[1], GlobalBatchNorm) and isinstance(converted[2], GlobalBatchNorm)
    assert converted[0] is bn[0]
    x = torch.randn(8, 4, 5, 5)
    ref = torch.nn.BatchNorm2d(4)
    torch.testing.assert_close(converted[1](x), ref(x))
    torch.testing.assert_close(converted[1].running_var, ref.running_var)
