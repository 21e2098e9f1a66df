"""How much of a training step ExCB's balancing costs: the operator B with the target softmax ("balance" phase)
plus the size-estimate update ("estimate" phase), as a share of the whole step (excb.method.step.train_step with its
PhaseTimer), for the ConvNet, ResNet-18 and ResNet-50 at their default sizes and K from 1k to 64k.

    .venv/bin/python experiments/balancing_overhead.py [--out experiments/results/balancing_overhead_cpu.json]
    .venv/bin/python experiments/balancing_overhead.py --small-batch   # batch 16 beside batch 256, same K

``--small-batch`` measures what a small batch does to the share: the ConvNet and ResNet-18 at batch 16 and at
batch 256 (ResNet-18: 64 on a CPU) for the recipe's K = 256 and K from 1k to 64k, in one run
(default output experiments/results/balancing_overhead_small_batch_cpu.json).

Default sizes: ConvNet and ResNet-18 (small stem) on Fashion-MNIST-sized images with the shipped recipe's crops
(2×28 + 4×12); ResNet-50 at 224 px with 2×224 + 6×96 crops. On a CPU the batch is cut for the ResNets (64 and 8)
to keep the run short: both the balancing and the rest of the step scale linearly with the batch, so the share
does not depend on it. The softmax is counted with the balancing, so the share is an upper bound.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from benchlib import machine
from step_profile import FASHION, RESNET50_224, profile

ROOT = Path(__file__).resolve().parent.parent

KS = (1024, 4096, 16384, 65536)


def prototypes(k: int) -> list[str]:
    """K prototypes; the profile never runs the k-means init, whose check (kmeans_samples >= K) would refuse K = 64k
    with the recipe's 20,000 samples."""
    return [f"model.num_prototypes={k}", "method.kmeans_init=false"]


def settings(cpu: bool) -> dict[str, tuple[list[str], int]]:
    """name → (config overrides, timed steps)."""
    r50 = [*RESNET50_224, f"train.batch_size={8 if cpu else 128}"] + (["train.precision=fp32"] if cpu else [])
    out: dict[str, tuple[list[str], int]] = {}
    for k in KS:
        out[f"convnet-K{k}"] = ([*FASHION, *prototypes(k)], 10)
        out[f"resnet18_small-K{k}"] = ([*FASHION, "model.backbone=resnet18_small",
                                        f"train.batch_size={64 if cpu else 256}", *prototypes(k)], 3)
        out[f"resnet50-K{k}"] = ([*r50, *prototypes(k)], 2 if cpu else 10)
    return out


def small_batch_settings(cpu: bool) -> dict[str, tuple[list[str], int]]:
    """name → (config overrides, timed steps): batch 16 next to the default batch, same K."""
    out: dict[str, tuple[list[str], int]] = {}
    for k in (256, *KS):
        for b in (16, 256):
            out[f"convnet-b{b}-K{k}"] = ([*FASHION, f"train.batch_size={b}", *prototypes(k)],
                                         40 if b == 16 else 10)
        for b in (16, 64 if cpu else 256):
            out[f"resnet18_small-b{b}-K{k}"] = ([*FASHION, "model.backbone=resnet18_small", f"train.batch_size={b}",
                                                 *prototypes(k)], 10 if b == 16 else 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON file (default experiments/results/balancing_overhead"
                    "[_small_batch]_<cpu|gpu>.json)")
    ap.add_argument("--small-batch", action="store_true", help="batch 16 beside the default batch, same K")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.out is None:
        mode, kind = "_small_batch" if args.small_batch else "", "gpu" if device.type == "cuda" else "cpu"
        args.out = str(ROOT / "experiments" / "results" / f"balancing_overhead{mode}_{kind}.json")
    table = small_batch_settings if args.small_batch else settings
    rows = []
    for name, (spec, steps) in table(device.type == "cpu").items():
        r = profile(name, spec, steps, device, compile_model=False)
        rows.append(r)
        print(f"{name}: {r['ms_per_step']:.0f} ms/step, balance {r['phase_ms'].get('balance', 0):.2f} ms + estimate "
              f"{r['phase_ms'].get('estimate', 0):.2f} ms = {100 * r['balancing_share']:.2f} % of the step", flush=True)
        tmp = Path(args.out + ".tmp")
        tmp.write_text(json.dumps({"machine": machine(), "command": " ".join(sys.argv), "rows": rows}, indent=1))
        tmp.replace(args.out)
    print("| backbone | K | batch | crops | ms/step | balance (B + softmax) ms | estimate ms | share of step |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['backbone']} | {r['num_prototypes']} | {r['batch']} | {r['crops']} | "
              f"{r['ms_per_step']:.0f} | {r['phase_ms'].get('balance', 0):.2f} | {r['phase_ms'].get('estimate', 0):.2f} | "
              f"{100 * r['balancing_share']:.2f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
