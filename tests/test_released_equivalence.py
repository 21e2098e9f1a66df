"""Equivalence with the authors' released implementation (github.com/ManiadisG/ExCB).

Each test compares ``excb`` with an independent reference computation written in plain torch/numpy (CPU, one
process, float64 where it helps) from the *behaviour* of one released function, named in the test's docstring.
The released code itself needs CUDA, einops and a process group, so it is not imported; the references below are
our own transcriptions of what it computes, in the spirit of comparing a loss with its authors' function.

Known differences that these tests deliberately do not cover (the released behaviour is not reproduced) are
listed in ``test_released_pairs_without_predictor_drop_local_crops`` and in the comments where they arise.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from excb.config import ConfigError, load_config
from excb.method.balancing import ClusterBalancer, balance_similarities
from excb.method.loss import excb_loss, view_pairs
from excb.method.model import build_student_teacher
from excb.method.schedules import build_schedules
from excb.method.step import apply_schedule, build_optimizer

ROOT = Path(__file__).resolve().parent.parent
RESNET = ROOT / "experiments" / "imagenet_resnet50_ep400.yaml"
VIT = ROOT / "experiments" / "imagenet_vits16_ep800.yaml"


# ----------------------------------------------------------------------------------------------------------------
# References (our own code, modelled on the released behaviour)
# ----------------------------------------------------------------------------------------------------------------

def ref_centering(z: np.ndarray, center: np.ndarray) -> np.ndarray:
    """engine/criterion.py, ClusteringLoss.centering_modifiers + ClusteringLoss.centering, on z [..., K].

    c = K·s/Σ|s| (an L1 normalisation of the centre times K); lower = 1 − relu(1 − c); higher = 1 − relu(1 − 1/c);
    z' = 1 − (1 − z)·lower; z'' = (z' + 1)·higher − 1; the row-wise argmax entry of z'' times 1.01; clamp [−1, 1].

    The released modifiers add uniform noise × 0.001 where a factor is *exactly* 0 (only a cluster whose size is
    exactly 0). Every test here uses strictly positive sizes, where that guard adds nothing, so the reference
    leaves it out (excb clamps c at 1e-8 instead: deterministic, different only for exactly-empty clusters).
    """
    k = center.shape[-1]
    c = center / np.abs(center).sum() * k
    lower = 1.0 - np.maximum(1.0 - c, 0.0)
    higher = 1.0 - np.maximum(1.0 - 1.0 / c, 0.0)
    z1 = 1.0 - (1.0 - z) * lower
    z2 = (z1 + 1.0) * higher - 1.0
    onehot = np.eye(k)[z2.argmax(-1)]
    return np.clip(z2 * (1.0 + 0.01 * onehot), -1.0, 1.0)


def ref_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def ref_teacher_targets(z: np.ndarray, center: np.ndarray, teacher_temp: float) -> np.ndarray:
    """engine/criterion.py, ClusteringLoss.centering then ClusteringLoss.apply_teacher_temp (softmax(z''/τ_t))."""
    return ref_softmax(ref_centering(z, center) / teacher_temp)


def ref_update_center(center: np.ndarray, teacher_out: np.ndarray, momentum: float) -> np.ndarray:
    """engine/criterion.py, ClusteringLoss.update_center on the balanced targets [views, batch, K].

    s ← m·s + (1 − m)·mean over views and batch of onehot(argmax). (The released code takes that mean in fp16,
    ``.half()`` before ``.mean``; the tests use views × batch a power of two, where every k/(views·batch) is exact
    in fp16, so the float64 reference is exact for the released code too. excb's histogram is float32.)
    """
    k = center.shape[-1]
    hist = np.eye(k)[teacher_out.argmax(-1)].mean(axis=(0, 1))
    return center * momentum + hist * (1.0 - momentum)


def ref_training_match(teacher_views: int, student_views: list[int], predictor: bool) -> dict:
    """engine/trainer.py, Trainer.unroll_batch's ``training_match``.

    Student outputs are [direct outputs of all crops (globals, then locals), then (with the predictor) the
    predictor outputs of all crops]. Teacher view i is matched with the student's direct output of every other
    global view and with indices n + j for every crop j, n = the number of crops (the predictor outputs).
    """
    n_crops = sum(student_views)
    f = 2 if predictor else 1
    predicted_outputs = list(range(n_crops, 2 * n_crops))
    matches = [[g for g in range(teacher_views) if g != view] + predicted_outputs for view in range(teacher_views)]
    return {"student_views": n_crops * f, "teacher_views": teacher_views, "matches": matches}


def ref_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, match: dict, student_temp: float) -> torch.Tensor:
    """engine/criterion.py, ClusteringLoss.forward's loss: student [(v_s·B), K] and teacher targets [(v_t·B), K],
    both view-major; for every teacher view iq and student view ip in matches[iq], the batch mean of
    −Σ_k q·log_softmax(p/τ_s); the mean over the matched pairs."""
    vs, vt = match["student_views"], match["teacher_views"]
    p_all = (student_out / student_temp).reshape(vs, -1, student_out.shape[-1])
    q_all = teacher_out.reshape(vt, -1, teacher_out.shape[-1])
    total, count = 0.0, 0
    for iq in range(vt):
        for ip in range(vs):
            if ip not in match["matches"][iq]:
                continue
            logp = p_all[ip] - torch.logsumexp(p_all[ip], dim=-1, keepdim=True)
            total = total + torch.sum(-q_all[iq] * logp, dim=-1).mean()
            count += 1
    return total / count


def _ref_mlp(layers: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """architectures/layers.py, MLP.forward in train mode, written out layer by layer with the given layers'
    parameters: Linear, BatchNorm1d on the batch's statistics (biased variance), ReLU or exact GELU."""
    for m in layers:
        if isinstance(m, torch.nn.Linear):
            x = x @ m.weight.T + (m.bias if m.bias is not None else 0.0)
        elif isinstance(m, torch.nn.BatchNorm1d):
            mean = x.mean(0, keepdim=True)
            var = ((x - mean) ** 2).mean(0, keepdim=True)
            x = (x - mean) / torch.sqrt(var + m.eps) * m.weight + m.bias
        elif isinstance(m, torch.nn.ReLU):
            x = torch.where(x > 0, x, torch.zeros_like(x))
        elif isinstance(m, torch.nn.GELU):
            x = 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
        else:
            raise AssertionError(f"unexpected layer {m}")
    return x


def _l2n(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def ref_student_forward(net: torch.nn.Module, proto_v: torch.Tensor, globals_: list[torch.Tensor],
                        locals_: list[torch.Tensor], per_size: bool = False) -> tuple[list, list]:
    """architectures/layers.py, MLPBottleneckClassifier.forward (predictor on, local_crop_grads False) behind
    engine/model.py, Classifier.forward with the student's input [globals, locals]:

    - the backbone runs once per list element (all global crops together, all local crops together);
    - the projector runs ONCE on the concatenation of every crop's features (BN statistics over all crops);
    - prototypes: weight_norm'd linear layer, gain fixed at 1, so row k is v_k/‖v_k‖, applied to the
      L2-normalised projection; the local crops' rows with detached prototypes;
    - predictor: BatchNorm1d(bottleneck) on the raw projections of all crops, then its MLP, scored with
      detached prototypes.

    ``per_size=True`` is NOT the released behaviour: the projector runs per crop size (BN statistics per size),
    used to show that the comparison can tell the two apart. Returns (direct, predicted), lists of [B, K] per crop.
    """
    b = globals_[0].shape[0]
    feats = [net.backbone(torch.cat(globals_)), net.backbone(torch.cat(locals_))]
    if per_size:
        proj = torch.cat([_ref_mlp(net.projector, f) for f in feats])
    else:
        proj = _ref_mlp(net.projector, torch.cat(feats))
    w = proto_v / proto_v.norm(dim=1, keepdim=True)  # weight_norm with g = 1
    vg = len(globals_) * b
    h = _l2n(proj)
    direct = torch.cat([h[:vg] @ w.T, h[vg:] @ w.detach().T])
    pred = _ref_mlp(net.predictor, proj)  # nn.Sequential(BatchNorm1d, Linear, [BN, act], Linear)
    predicted = _l2n(pred) @ w.detach().T
    return list(direct.split(b)), list(predicted.split(b))


def ref_scheduling(max_value: float, min_value: float, step: float, of_steps: float, decreasing: bool = True) -> float:
    """utils/misc.py, scheduling (cosine): decreasing from max to min, or increasing from min to max, over
    step/of_steps ∈ [0, 1]."""
    x = 0.5 * (1.0 + math.cos(math.pi * step / of_steps))
    if decreasing:
        return min_value + (max_value - min_value) * x
    return max_value + (min_value - max_value) * x


class RefLRScheduler:
    """engine/optimizer.py, LRScheduler with lr_schedule=cosine over the five groups BuildOptimizer.build_optimizer
    creates (backbone, backbone_noreg, projector, projector_noreg, centroids; noreg groups have wd 0).

    ``step()`` first increments its counter u, then sets every group's lr (linear warm-up lr·u/W for u < W, else
    cosine from lr to lr·lr_min_factor over (u − W)/(T − W)) and, for groups with wd > 0, the wd (constant when
    weight_decay_target_factor is 1, else ``scheduling`` between wd and wd·factor at u/T, increasing or
    decreasing); with centroid_adjustments "wdx10c1" the last group's wd is wd·(9·scheduling(1, 0, u, T) + 1).
    """

    def __init__(self, lr: float, lr_min_factor: float, weight_decay: float, weight_decay_target_factor: float,
                 centroid_adjustments: str | None, steps: int, warmup_steps: int) -> None:
        self.lr, self.lr_min_factor, self.steps, self.warmup_steps = lr, lr_min_factor, steps, warmup_steps
        self.factor, self.centroid_adjustments = weight_decay_target_factor, centroid_adjustments
        self.default_wd = [weight_decay, 0.0, weight_decay, 0.0, weight_decay]
        self.groups = [{"lr": lr, "weight_decay": wd} for wd in self.default_wd]
        self.current_step = 0

    def _lr(self) -> float:
        u, w, t = self.current_step, self.warmup_steps, self.steps
        lr_min = self.lr * self.lr_min_factor
        if u < w:
            return self.lr * u / w
        return lr_min + 0.5 * (self.lr - lr_min) * (1 + math.cos(math.pi * (u - w) / (t - w)))

    def step(self) -> None:
        self.current_step += 1
        for i, g in enumerate(self.groups):
            g["lr"] = self._lr()
            wd = self.default_wd[i]
            if self.factor == 1.0:
                new_wd = wd
            else:
                target = wd * self.factor
                new_wd = ref_scheduling(max(target, wd), min(target, wd), self.current_step, self.steps,
                                        decreasing=target < wd)
            if g["weight_decay"] > 0:
                g["weight_decay"] = new_wd
            if i == len(self.groups) - 1 and self.centroid_adjustments == "wdx10c1":
                g["weight_decay"] = new_wd * (ref_scheduling(1, 0, self.current_step, self.steps) * 9 + 1)


def ref_released_run(args: dict, steps_per_epoch: int) -> dict[str, np.ndarray]:
    """main.py + engine/trainer.py, Trainer.train_epoch: per optimiser step, scheduler.step() *before* the step
    (lr, wd of group 0 = backbone, of group 1 = backbone_noreg, of the last group = centroids), the EMA momentum
    ``scheduling(ema_end_value, ema_momentum, train_step, T, decreasing=False)`` with the 0-based train_step, and
    per epoch the crop scale ``scheduling(crop_min_scale, crop_min_scale_final, epoch, epochs)``."""
    epochs = args["epochs"]
    total = steps_per_epoch * epochs
    sched = RefLRScheduler(args["lr"], args["lr_min_factor"], args["weight_decay"], args["weight_decay_target_factor"],
                           args["centroid_adjustments"], total, steps_per_epoch * args["warmup_epochs"])
    out: dict[str, list[float]] = {k: [] for k in ("lr", "wd", "wd_noreg", "wd_centroid", "ema", "crop")}
    train_step = 0
    for epoch in range(epochs):
        out["crop"].append(ref_scheduling(args["crop_min_scale"], args["crop_min_scale_final"], epoch, epochs))
        for _ in range(steps_per_epoch):
            sched.step()
            out["lr"].append(sched.groups[0]["lr"])
            out["wd"].append(sched.groups[0]["weight_decay"])
            out["wd_noreg"].append(sched.groups[1]["weight_decay"])
            out["wd_centroid"].append(sched.groups[-1]["weight_decay"])
            out["ema"].append(ref_scheduling(args["ema_end_value"], args["ema_momentum"], train_step, total,
                                             decreasing=False))
            train_step += 1
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


# The released configs' schedule arguments (configs/main_config.yaml, with configs/resnet50_ep400.yaml or
# configs/vit_s16_ep800.yaml on top), epochs and warm-up shrunk like the excb recipes below.
RELEASED_ARGS = {
    "resnet50": {"lr": 0.6, "lr_min_factor": 1e-4, "weight_decay": 1e-4, "weight_decay_target_factor": 1.0,
                 "centroid_adjustments": "wdx10c1", "ema_momentum": 0.996, "ema_end_value": 1.0,
                 "crop_min_scale": 0.26, "crop_min_scale_final": 0.14},
    "vit_s16": {"lr": 0.002, "lr_min_factor": 1e-4, "weight_decay": 0.04, "weight_decay_target_factor": 10.0,
                "centroid_adjustments": "wdx10c1", "ema_momentum": 0.996, "ema_end_value": 1.0,
                "crop_min_scale": 0.26, "crop_min_scale_final": 0.14},
}


# ----------------------------------------------------------------------------------------------------------------
# 1. The balancing operator
# ----------------------------------------------------------------------------------------------------------------

def _random_sizes(rng: np.random.Generator, k: int) -> np.ndarray:
    """Strictly positive, far from uniform (some clusters ~100× others), not summing to 1."""
    return rng.random(k) ** 3 * 5.0 + 1e-3


def test_reference_operator_reproduces_the_method_page_example() -> None:
    """engine/criterion.py, ClusteringLoss.centering: the worked example (K = 2, s = (0.9, 0.1)) plus the boost."""
    out = ref_centering(np.array([[0.5, 0.2], [1.0, -1.0]]), np.array([0.9, 0.1]))
    np.testing.assert_allclose(out, [[-1 / 6, 0.84 * 1.01], [1 / 9, 0.6 * 1.01]], atol=1e-12)


@pytest.mark.parametrize("k,n,seed", [(2, 8, 0), (10, 33, 1), (257, 16, 2), (1000, 5, 3)])
def test_balance_similarities_equals_released_centering(k: int, n: int, seed: int) -> None:
    """engine/criterion.py, ClusteringLoss.centering_modifiers + ClusteringLoss.centering vs
    excb.method.balancing.balance_similarities(z, sizes, argmax_boost=1.01)."""
    rng = np.random.default_rng(seed)
    z = rng.uniform(-1, 1, (n, k))
    z[0] = -rng.uniform(0.1, 1, k)  # a row whose maximum is negative: the 1.01 boost pushes it further down
    z[1, 0] = 1.0  # a similarity of exactly 1, boosted above 1 then clamped
    sizes = _random_sizes(rng, k)
    expected = ref_centering(z, sizes)
    got = balance_similarities(torch.from_numpy(z), torch.from_numpy(sizes), argmax_boost=1.01)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)
    got32 = balance_similarities(torch.from_numpy(z).float(), torch.from_numpy(sizes).float(), argmax_boost=1.01)
    np.testing.assert_allclose(got32.numpy(), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("k,b,seed", [(10, 4, 0), (64, 8, 1), (300, 16, 2)])
def test_cluster_balancer_targets_equal_released_teacher_targets(k: int, b: int, seed: int) -> None:
    """engine/criterion.py, ClusteringLoss.centering + ClusteringLoss.apply_teacher_temp on [views, batch, K]
    vs excb.method.balancing.ClusterBalancer.targets(z, 0.04) per global view."""
    rng = np.random.default_rng(seed)
    z = rng.uniform(-1, 1, (2, b, k))
    balancer = ClusterBalancer(k, momentum=0.999, argmax_boost=1.01).double()
    balancer.sizes.copy_(torch.from_numpy(_random_sizes(rng, k)))
    expected = ref_teacher_targets(z, balancer.sizes.numpy(), 0.04)
    for v in range(2):
        got = balancer.targets(torch.from_numpy(z[v]), 0.04)
        np.testing.assert_allclose(got.numpy(), expected[v], rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# 2. The size-estimate update
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k,b,momentum,seed", [(10, 4, 0.999, 0), (10, 8, 0.9, 1), (32, 16, 0.9, 2),
                                               (7, 8, 0.5, 3)])
def test_size_estimate_follows_released_update_center(k: int, b: int, momentum: float, seed: int) -> None:
    """engine/criterion.py, ClusteringLoss.update_center (after ClusteringLoss.centering and apply_teacher_temp)
    over 12 steps with 2 global views vs excb.method.balancing.ClusterBalancer.targets + observe. The similarities are
    skewed towards a few clusters so the estimate moves away from uniform and the operator changes labels."""
    rng = np.random.default_rng(seed)
    balancer = ClusterBalancer(k, momentum=momentum, argmax_boost=1.01)
    center = np.full(k, 1.0 / k)  # the released buffer starts at ones/K as well
    np.testing.assert_allclose(balancer.sizes.numpy(), center, rtol=1e-7)
    skew = np.linspace(0.5, 0.0, k)
    changed = 0
    for _ in range(12):
        z = np.clip(rng.uniform(-1, 1, (2, b, k)) * 0.5 + skew, -1, 1)
        q = ref_teacher_targets(z, center, 0.04)
        changed += int((q.argmax(-1) != z.argmax(-1)).sum())
        center = ref_update_center(center, q, momentum)

        zt = torch.from_numpy(z)
        p = [balancer.targets(zt[v], 0.04) for v in range(2)]
        np.testing.assert_allclose(torch.stack(p).numpy(), q, rtol=1e-5, atol=1e-7)
        balancer.observe(zt.reshape(2 * b, k), torch.cat(p))
        np.testing.assert_allclose(balancer.sizes.double().numpy(), center, rtol=1e-6, atol=1e-9)
    assert not np.allclose(center, 1.0 / k)
    if momentum < 0.99:
        assert changed > 0  # the operator did change some teacher labels along the way


# ----------------------------------------------------------------------------------------------------------------
# 3. The loss and its view pairs
# ----------------------------------------------------------------------------------------------------------------

def _pairs_from_match(match: dict, num_crops: int) -> set[tuple[int, str, int]]:
    """Released (teacher view, student output index) → excb (teacher view, kind, crop)."""
    return {(i, "direct" if ip < num_crops else "predicted", ip % num_crops)
            for i, ms in enumerate(match["matches"]) for ip in ms if ip < match["student_views"]}


@pytest.mark.parametrize("num_local", [6, 2, 0])
def test_view_pairs_equal_released_training_match(num_local: int) -> None:
    """engine/trainer.py, Trainer.unroll_batch (training_match, predictor on) vs excb.method.loss.view_pairs."""
    n = 2 + num_local
    match = ref_training_match(2, [2, num_local] if num_local else [2], predictor=True)
    pairs = view_pairs(2, n, True)
    assert len(pairs) == len(set(pairs)) == 2 * (1 + n)
    assert set(pairs) == _pairs_from_match(match, n)
    if num_local == 6:
        assert len(pairs) == 18


def test_released_pairs_without_predictor_drop_local_crops() -> None:
    """engine/trainer.py, Trainer.unroll_batch with predictor off: the matches still point at indices n + j,
    which do not exist among the n direct outputs, so only the other global view is matched and the local crops
    are silently unused. A documented difference: excb keeps every crop's direct output (except view i itself)."""
    match = ref_training_match(2, [2, 6], predictor=False)
    assert _pairs_from_match(match, 8) == {(0, "direct", 1), (1, "direct", 0)}
    assert len(view_pairs(2, 8, False)) == 14


@pytest.mark.parametrize("k,b,num_local,seed", [(10, 4, 6, 0), (64, 8, 6, 1), (16, 3, 2, 2), (10, 5, 0, 3)])
def test_excb_loss_equals_released_loss(k: int, b: int, num_local: int, seed: int) -> None:
    """engine/criterion.py, ClusteringLoss.forward (loss over training_match from engine/trainer.py,
    Trainer.unroll_batch) vs excb.method.loss.excb_loss(teacher_probs, direct, predicted, 0.1): value and gradients
    with respect to every student output."""
    gen = torch.Generator().manual_seed(seed)
    n = 2 + num_local
    teacher = torch.softmax(torch.randn(2, b, k, generator=gen, dtype=torch.float64) / 0.3, dim=-1)
    direct = (torch.rand(n, b, k, generator=gen, dtype=torch.float64) * 2 - 1).requires_grad_()
    predicted = (torch.rand(n, b, k, generator=gen, dtype=torch.float64) * 2 - 1).requires_grad_()

    match = ref_training_match(2, [2, num_local] if num_local else [2], predictor=True)
    student_out = torch.cat([direct, predicted]).reshape(2 * n * b, k)  # view-major, like the released (v b) f
    ref = ref_loss(student_out, teacher.reshape(2 * b, k), match, 0.1)
    ref_gd, ref_gp = torch.autograd.grad(ref, [direct, predicted])

    d32 = direct.detach().float().requires_grad_()
    p32 = predicted.detach().float().requires_grad_()
    got = excb_loss(list(teacher.float()), list(d32), list(p32), 0.1)
    got.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    np.testing.assert_allclose(d32.grad.numpy(), ref_gd.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(p32.grad.numpy(), ref_gp.numpy(), rtol=0, atol=1e-6)
    # only the other global view's direct output is used: the direct outputs of the locals get no gradient
    assert torch.all(d32.grad[2:] == 0)


# ----------------------------------------------------------------------------------------------------------------
# 4. The heads
# ----------------------------------------------------------------------------------------------------------------

def _tiny_cfg(head_norm: str, *extra: str):
    return load_config(None, ["model.backbone=convnet", "model.convnet_widths=[8,16]", "model.projector_hidden=32",
                              "model.predictor_hidden=32", "model.projector_out=16", "model.num_prototypes=10",
                              f"model.head_norm={head_norm}", "model.use_predictor=true", "data.channels=1",
                              "augment.global_size=28", "augment.local_size=12", "augment.num_local=6", *extra])


def _crops(seed: int, b: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return ([torch.randn(b, 1, 28, 28, generator=gen) for _ in range(2)]
            + [torch.randn(b, 1, 12, 12, generator=gen) for _ in range(6)])


def _weighted_sum(direct: list[torch.Tensor], predicted: list[torch.Tensor], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1000)
    return sum((torch.randn(z.shape, generator=gen) * z).sum() for z in direct + predicted)


@pytest.mark.parametrize("head_norm,seed", [("bn", 0), ("bn", 1), ("none", 2)])
def test_student_heads_equal_released_classifier(head_norm: str, seed: int) -> None:
    """architectures/layers.py, MLPBottleneckClassifier.forward (projector once over all crops, weight-normalised
    prototypes with gain 1, detached prototypes for local crops and the predictor path, predictor = BN on the raw
    projections then its MLP) behind engine/model.py, Classifier.forward, vs excb.method.model.ExcbNetwork.forward in
    train mode: 2 global crops of 28 px, 6 local crops of 12 px, batch 4. Outputs and the gradients of every
    parameter (the prototypes' only from the global crops' direct outputs)."""
    torch.manual_seed(seed)
    student, _ = build_student_teacher(_tiny_cfg(head_norm))
    with torch.no_grad():  # prototypes of unequal norms, so the weight normalisation matters
        student.prototypes.weight.mul_(torch.rand(student.prototypes.weight.shape[0], 1) * 3 + 0.5)
    reference = copy.deepcopy(student)
    student.train()
    reference.train()
    crops = _crops(seed)

    out = student(crops, num_global=2)
    ref_direct, ref_pred = ref_student_forward(reference, reference.prototypes.weight, crops[:2], crops[2:])
    assert len(out.direct) == len(out.predicted) == 8
    for got, exp in zip(out.direct + out.predicted, ref_direct + ref_pred):
        assert got.shape == (4, 10)
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)

    _weighted_sum(out.direct, out.predicted, seed).backward()
    _weighted_sum(ref_direct, ref_pred, seed).backward()
    ref_params = dict(reference.named_parameters())
    # float32 throughout (excb scores prototypes in fp32): absolute tolerance relative to the largest gradient;
    # biases followed by BN have an exactly zero true gradient, of which both sides hold only rounding noise
    scale = max(p.grad.abs().max().item() for p in ref_params.values())
    for name, p in student.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-5 * scale, msg=name)

    # the prototypes' gradient comes from the two global crops' direct outputs only
    v = reference.prototypes.weight.detach().clone().requires_grad_()
    d, _ = ref_student_forward(reference, v, crops[:2], crops[2:])
    gen = torch.Generator().manual_seed(seed + 1000)
    weights = [torch.randn(z.shape, generator=gen) for z in d]
    (g_global,) = torch.autograd.grad(sum((w * z).sum() for w, z in zip(weights[:2], d[:2])), v)
    # float32 sums in another order: one element of 160 once differed by 3.8e-6 (0.02 %) in the full suite
    torch.testing.assert_close(student.prototypes.weight.grad, g_global, rtol=1e-4,
                               atol=1e-5 * g_global.abs().max().item())


@pytest.mark.parametrize("seed", [0, 1])
def test_teacher_heads_equal_released_classifier(seed: int) -> None:
    """engine/trainer.py, Trainer.train_forward: teacher([global crops]) — one list element, so the backbone and
    projector run on the two global views together, no predictor — vs the excb teacher's direct scores."""
    torch.manual_seed(seed)
    student, teacher = build_student_teacher(_tiny_cfg("bn"))
    teacher.train()
    crops = _crops(seed)[:2]
    with torch.no_grad():
        got = teacher(crops, num_global=2)
        x = torch.cat(crops)
        h = _l2n(_ref_mlp(teacher.projector, teacher.backbone(x)))
        w = teacher.prototypes.weight
        expected = (h @ (w / w.norm(dim=1, keepdim=True)).T).split(4)
    assert got.predicted is None and len(got.direct) == 2
    for g, e in zip(got.direct, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_per_size_projector_batching_is_distinguishable(seed: int) -> None:
    """architectures/layers.py, MLPBottleneckClassifier.forward batches the projector over all crops; running it
    per crop size instead (BN statistics per size) changes every output by far more than the tolerance of
    ``test_student_heads_equal_released_classifier``, so that test tells the two apart. Without BN in the heads
    (ViT recipe) the two are identical."""
    torch.manual_seed(seed)
    student, _ = build_student_teacher(_tiny_cfg("bn"))
    student.train()
    crops = _crops(seed)
    with torch.no_grad():
        joint_d, joint_p = ref_student_forward(student, student.prototypes.weight, crops[:2], crops[2:])
        sized_d, sized_p = ref_student_forward(student, student.prototypes.weight, crops[:2], crops[2:],
                                               per_size=True)
        out = student(crops, num_global=2)
    for a, b in zip(joint_d + joint_p, sized_d + sized_p):
        assert (a - b).abs().max() > 1e-3
    for got, exp in zip(out.direct + out.predicted, joint_d + joint_p):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)

    torch.manual_seed(seed)
    plain, _ = build_student_teacher(_tiny_cfg("none"))
    plain.train()
    with torch.no_grad():
        a = ref_student_forward(plain, plain.prototypes.weight, crops[:2], crops[2:])
        b = ref_student_forward(plain, plain.prototypes.weight, crops[:2], crops[2:], per_size=True)
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)

    try:  # excb's ablation switch, where available: per_size must then match the per-size reference
        cfg = _tiny_cfg("bn", "model.projector_batching=per_size")
    except ConfigError:
        return
    torch.manual_seed(seed)
    ablation, _ = build_student_teacher(cfg)
    ablation.load_state_dict(student.state_dict())
    ablation.train()
    with torch.no_grad():
        out = ablation(crops, num_global=2)
    for got, exp in zip(out.direct + out.predicted, sized_d + sized_p):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# 5. The schedules
# ----------------------------------------------------------------------------------------------------------------

EPOCHS, WARMUP = 7, 2


def _recipe(path: Path, *extra: str):
    return load_config(path, [f"train.epochs={EPOCHS}", f"optim.warmup_epochs={WARMUP}", *extra])


@pytest.mark.parametrize("path,arch", [(RESNET, "resnet50"), (VIT, "vit_s16")])
def test_recipe_schedule_arguments_match_released_configs(path: Path, arch: str) -> None:
    """configs/main_config.yaml + configs/resnet50_ep400.yaml / configs/vit_s16_ep800.yaml: the excb recipe's
    schedule settings are the released arguments (wd_end = weight_decay·weight_decay_target_factor; "wdx10c1" =
    prototype wd factor 10 → 1)."""
    cfg = load_config(path)
    args = RELEASED_ARGS[arch]
    assert cfg.optim.lr == args["lr"] and cfg.optim.min_lr_ratio == args["lr_min_factor"]
    assert cfg.optim.warmup_epochs == 10
    assert cfg.optim.weight_decay == args["weight_decay"]
    assert cfg.optim.weight_decay_end == pytest.approx(args["weight_decay"] * args["weight_decay_target_factor"])
    assert (cfg.optim.prototype_wd_start_factor, cfg.optim.prototype_wd_end_factor) == (10.0, 1.0)
    assert (cfg.method.ema_start, cfg.method.ema_end) == (args["ema_momentum"], args["ema_end_value"])
    assert (cfg.augment.crop_min_start, cfg.augment.crop_min_end) == (args["crop_min_scale"],
                                                                      args["crop_min_scale_final"])


@pytest.mark.parametrize("spe", [13, 4])
@pytest.mark.parametrize("path,arch", [(RESNET, "resnet50"), (VIT, "vit_s16")])
def test_schedules_equal_released_run(path: Path, arch: str, spe: int) -> None:
    """engine/optimizer.py, LRScheduler (cosine lr with warm-up, counter incremented before computing; wd with
    weight_decay_target_factor: ResNet constant 1e-4, ViT 0.04 → 0.4; "wdx10c1" centroid wd), utils/misc.py,
    scheduling for the EMA momentum (0-based train_step, engine/trainer.py, Trainer.train_epoch) and the crop
    scale (per epoch) vs excb.method.schedules.build_schedules for the paper recipe (7 epochs, 2 warm-up epochs)."""
    cfg = _recipe(path)
    ref = ref_released_run({**RELEASED_ARGS[arch], "epochs": EPOCHS, "warmup_epochs": WARMUP}, spe)
    s = build_schedules(cfg, spe)
    assert s.total_steps == EPOCHS * spe and s.steps_per_epoch == spe
    np.testing.assert_allclose(s.lr, ref["lr"], rtol=1e-12, atol=0)
    np.testing.assert_allclose(s.weight_decay, ref["wd"], rtol=1e-12, atol=0)
    np.testing.assert_allclose(s.prototype_weight_decay, ref["wd_centroid"], rtol=1e-12, atol=0)
    np.testing.assert_allclose(s.ema_momentum, ref["ema"], rtol=1e-12, atol=0)
    np.testing.assert_allclose(s.crop_min_scale, ref["crop"], rtol=1e-12, atol=0)
    # the indexing details: first step already warm, last step exactly on the lr floor and the wd end value
    assert s.lr[0] == pytest.approx(cfg.optim.lr / (WARMUP * spe), rel=1e-12)
    assert s.lr[WARMUP * spe - 1] == pytest.approx(cfg.optim.lr, rel=1e-12)
    assert s.lr[-1] == pytest.approx(cfg.optim.lr * cfg.optim.min_lr_ratio, rel=1e-12)
    assert s.ema_momentum[0] == pytest.approx(cfg.method.ema_start, rel=1e-15)
    assert s.ema_momentum[-1] < cfg.method.ema_end
    if arch == "vit_s16":
        assert s.weight_decay[0] > 0.04 and s.weight_decay[-1] == pytest.approx(0.4, rel=1e-12)
    else:
        assert np.all(s.weight_decay == 1e-4)
    # lr_scale (fewer workers than the recipe's) multiplies the lr only
    half = build_schedules(cfg, spe, lr_scale=0.5)
    np.testing.assert_allclose(half.lr, 0.5 * ref["lr"], rtol=1e-12, atol=0)
    np.testing.assert_array_equal(half.weight_decay, s.weight_decay)


@pytest.mark.parametrize("path,arch", [(RESNET, "resnet50"), (VIT, "vit_s16")])
def test_optimizer_groups_follow_released_scheduler(path: Path, arch: str) -> None:
    """engine/optimizer.py, BuildOptimizer.build_optimizer + LRScheduler.step: per step, every group's lr, the
    regular groups' wd, the no-decay groups' wd (0) and the centroid group's wd, vs excb.method.step.apply_schedule on
    excb's groups (regular, no_decay, prototypes) — with a tiny network in place of the recipe's backbone."""
    spe = 5
    cfg = _recipe(path, "model.backbone=convnet", "model.convnet_widths=[4]", "model.projector_hidden=8",
                  "model.predictor_hidden=8", "model.projector_out=4", "model.num_prototypes=3",
                  "model.head_norm=bn", "model.drop_path=0", "data.channels=1", "data.mean=[0.5]",
                  "data.std=[0.5]")
    student, _ = build_student_teacher(cfg)
    optimizer = build_optimizer(cfg, student)
    schedules = build_schedules(cfg, spe)
    ref = ref_released_run({**RELEASED_ARGS[arch], "epochs": EPOCHS, "warmup_epochs": WARMUP}, spe)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"regular", "no_decay", "prototypes"}
    for step in range(EPOCHS * spe):
        apply_schedule(optimizer, schedules, step)
        for g in optimizer.param_groups:
            assert g["lr"] == pytest.approx(ref["lr"][step], rel=1e-12)
        assert groups["regular"]["weight_decay"] == pytest.approx(ref["wd"][step], rel=1e-12)
        assert groups["no_decay"]["weight_decay"] == ref["wd_noreg"][step] == 0.0
        assert groups["prototypes"]["weight_decay"] == pytest.approx(ref["wd_centroid"][step], rel=1e-12)
