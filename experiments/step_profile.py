"""Profile ExCB training steps on synthetic in-memory uint8 images, on CPU or GPU, without Ray: images/s, the
time of each phase of the step, and peak accelerator memory. Each setting is a label plus config overrides.

    .venv/bin/python experiments/step_profile.py --out results.json [--steps 20] [--compile] [--setting NAME K=V ...]

A setting's overrides may start with ``config=PATH`` (a recipe to apply them to, e.g.
``--setting fm-b64-bf16 config=experiments/fashion_mnist.yaml train.batch_size=64 train.precision=bf16``), and
``train.torch_threads`` sets the intra-op threads (0 = torch's default).

Without --setting it runs the built-in settings for the device it finds (GPU: ResNet-50 at 224 px with 2×224 +
6×96 crops, K = 65,536, bf16, channels_last, at two batch sizes; then the Fashion-MNIST ConvNet; CPU: the
Fashion-MNIST ConvNet and ResNet-18). Phase times come from synchronised timers (PhaseTimer); images/s is measured
separately without them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from excb.config import load_config
from excb.method.learner import ExcbLearner
from excb.method.step import PhaseTimer

ROOT = Path(__file__).resolve().parent.parent

RESNET50_224 = ["model.backbone=resnet50", "data.channels=3", "data.image_size=224", "data.mean=[0.485,0.456,0.406]",
                "data.std=[0.229,0.224,0.225]", "augment.global_size=224", "augment.local_size=96",
                "augment.num_local=6", "model.num_prototypes=65536", "model.projector_hidden=2048",
                "model.predictor_hidden=2048", "model.projector_out=256", "train.precision=bf16"]
# the settings named "-b256" keep the batch and precision they were first profiled with (the default recipe has
# since moved to batch 32 and precision auto)
FASHION = ["config=experiments/fashion_mnist.yaml", "train.batch_size=256", "train.precision=fp32"]
GPU_SETTINGS = {
    "resnet50-224-b128-bf16": RESNET50_224 + ["train.batch_size=128"],
    "resnet50-224-b256-bf16": RESNET50_224 + ["train.batch_size=256"],
    "resnet50-224-b128-fp32": RESNET50_224 + ["train.batch_size=128", "train.precision=fp32"],
    "convnet-fashion-b256": FASHION,
    "resnet18_small-fashion-b256": FASHION + ["model.backbone=resnet18_small"],
    **{f"resnet50-224-b128-bf16-K{k}": RESNET50_224 + ["train.batch_size=128", f"model.num_prototypes={k}"]
       for k in (1024, 4096, 16384)},
}
CPU_SETTINGS = {
    "convnet-fashion-b256": FASHION,
    "resnet18_small-fashion-b256": FASHION + ["model.backbone=resnet18_small"],
}


def profile(label: str, spec: list[str], steps: int, device: torch.device, compile_model: bool) -> dict[str, Any]:
    config = None
    if spec[:1] and spec[0].startswith("config="):
        config, spec = spec[0].removeprefix("config="), spec[1:]
    compile_flag = ["train.compile=true"] if compile_model else []
    cfg = load_config(ROOT / config if config else None, [*spec, *compile_flag])
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    learner = ExcbLearner(cfg, 2 * steps + 10, device=device)  # views drawn with a CPU generator, as in training
    b, c, s = cfg.train.batch_size, cfg.data.channels, cfg.data.image_size
    x = torch.randint(0, 256, (b, c, s, s), dtype=torch.uint8, generator=learner.gen).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_warm = time.perf_counter()
    for _ in range(3):
        learner.step(x)
    warmup_s = time.perf_counter() - t_warm

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        stats = learner.step(x)
    sync()
    per_step = (time.perf_counter() - t0) / steps
    timer = PhaseTimer(device)
    for _ in range(steps):
        learner.step(x, timer=timer)
    phases = {k: v / steps for k, v in timer.seconds.items()}
    total = sum(phases.values())
    out = {"setting": label, "overrides": spec, "config": config, "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "backbone": cfg.model.backbone, "batch": b, "precision": cfg.train.precision,
           "compiled": compile_model, "torch_threads": torch.get_num_threads(),
           "num_prototypes": cfg.model.num_prototypes, "crops": f"2x{cfg.augment.global_size}+"
           f"{cfg.augment.num_local}x{cfg.augment.local_size}",
           "ms_per_step": 1000 * per_step, "images_per_second": b / per_step, "warmup_seconds": warmup_s,
           "phase_ms": {k: 1000 * v for k, v in phases.items()},
           "phase_share": {k: v / total for k, v in phases.items()},
           "balancing_share": (phases.get("balance", 0.0) + phases.get("estimate", 0.0)) / total,
           "final_loss": float(stats.loss)}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True, help="JSON file to write (rewritten after every setting)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--compile", action="store_true", help="also run each GPU ResNet setting with torch.compile")
    ap.add_argument("--setting", nargs="+", action="append", default=[], metavar="NAME_THEN_OVERRIDES")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = ({s[0]: s[1:] for s in args.setting} if args.setting
                else GPU_SETTINGS if device.type == "cuda" else CPU_SETTINGS)
    results: list[dict[str, Any]] = []
    runs = [(name, spec, False) for name, spec in settings.items()]
    if args.compile and device.type == "cuda":
        runs.append(("resnet50-224-b128-bf16-compiled", GPU_SETTINGS["resnet50-224-b128-bf16"], True))
    for name, spec, compiled in runs:
        try:
            r = profile(name, spec, args.steps, device, compiled)
        except Exception as e:  # noqa: BLE001 - record and go on to the next setting
            r = {"setting": name, "error": f"{type(e).__name__}: {e}"}
        results.append(r)
        print(json.dumps(r), flush=True)
        tmp = Path(args.out + ".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(args.out)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
