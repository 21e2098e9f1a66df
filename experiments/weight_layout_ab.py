"""Step time by memory layout of the network's weights, the three arms interleaved in one process so that they
share whatever else the machine is doing (this VM's speed drifts by ±15 % over minutes):

- ``nhwc``: ``model.channels_last=true`` as the networks are built today: NHWC crops, NHWC 4-D weights;
- ``nhwc_crops_nchw_weights``: the same networks with their weights put back to NCHW (how they were built before
  2026-12-03: only the crops were NHWC, so with one input channel, where an NHWC batch is also NCHW, the whole
  network ran NCHW);
- ``nchw``: ``model.channels_last=false``.

    .venv/bin/python experiments/weight_layout_ab.py --out experiments/results/weight_layout_ab_cpu.json [--rounds 20]

Each setting builds one learner per arm (``ExcbLearner``, the project's training step, synthetic uint8 images,
``train.torch_threads=1`` unless given), warms each up for 3 steps, then runs ``--rounds`` rounds of one step per
arm in a shuffled order, and reports each arm's median step time and its ratio to ``nhwc_crops_nchw_weights``.
The JSON (rewritten atomically after every setting) also describes the machine (``benchlib.machine``) and
torch version.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import machine  # noqa: E402

from excb.config import load_config  # noqa: E402
from excb.method.learner import ExcbLearner  # noqa: E402

RECIPE = ROOT / "experiments" / "fashion_mnist.yaml"
SETTINGS = {
    "convnet-b32-auto (default recipe)": [],
    "convnet-b256-fp32 (claims grid)": ["train.batch_size=256", "optim.lr=0.3", "train.precision=fp32"],
    "resnet18_small-b32-auto": ["model.backbone=resnet18_small"],
}
BEFORE = "nhwc_crops_nchw_weights"


def learners(overrides: list[str], device: torch.device) -> dict[str, ExcbLearner]:
    """One learner per arm, built from the same seed (equal initial weights)."""
    cfg = load_config(RECIPE, overrides)
    arms = {"nhwc": ExcbLearner(cfg, 1000, device=device)}
    before = ExcbLearner(cfg, 1000, device=device)
    for net in (before.student, before.teacher):
        net.to(memory_format=torch.contiguous_format)
    arms[BEFORE] = before
    arms["nchw"] = ExcbLearner(load_config(RECIPE, [*overrides, "model.channels_last=false"]), 1000, device=device)
    return arms


def measure(label: str, overrides: list[str], rounds: int, device: torch.device, rng: random.Random) -> dict[str, Any]:
    if not any(o.startswith("train.torch_threads=") for o in overrides):
        overrides = [*overrides, "train.torch_threads=1"]
    arms = learners(overrides, device)
    cfg = arms["nhwc"].cfg
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    b, c, s = cfg.train.batch_size, cfg.data.channels, cfg.data.image_size
    x = torch.randint(0, 256, (b, c, s, s), dtype=torch.uint8).to(device)

    def step(learner: ExcbLearner) -> float:
        t = time.perf_counter()
        learner.step(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t

    for learner in arms.values():
        for _ in range(3):
            step(learner)
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(rounds):
        order = list(arms)
        rng.shuffle(order)
        for k in order:
            times[k].append(step(arms[k]))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"setting": label, "overrides": overrides, "batch": b, "backbone": cfg.model.backbone,
            "precision": cfg.train.precision, "autocast": str(arms["nhwc"].autocast_dtype),
            "torch_threads": torch.get_num_threads(), "rounds": rounds,
            "median_ms": {k: 1000 * v for k, v in med.items()},
            "ratio_to_" + BEFORE: {k: v / med[BEFORE] for k, v in med.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--rounds", type=int, default=20, help="steps per arm and setting, after 3 warm-up steps")
    ap.add_argument("--setting", nargs="+", action="append", default=[], metavar="NAME_THEN_OVERRIDES",
                    help="a label and recipe overrides (default: the three built-in settings)")
    ap.add_argument("--seed", type=int, default=0, help="of the arm order")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = {s[0]: s[1:] for s in args.setting} if args.setting else SETTINGS
    rng = random.Random(args.seed)
    out: dict[str, Any] = {"command": " ".join(["experiments/weight_layout_ab.py", *sys.argv[1:]]),
                           "device": machine(),
                           "torch": torch.__version__, "results": []}
    for label, overrides in settings.items():
        r = measure(label, overrides, args.rounds, device, rng)
        print(json.dumps(r), flush=True)
        out["results"].append(r)
        tmp = Path(args.out + ".tmp")
        tmp.write_text(json.dumps(out, indent=2) + "\n")
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
