"""The fused loss against PyTorch's own cross-entropy, side by side in one run
(docs/performance.md, "Numbers").

    .venv/bin/python scripts/bench_cpu.py [--rounds 3] [--iterations 20] [--losscc NAME=BIN ...]

Each round times, one after the other on the same machine: PyTorch's
`torch.nn.functional.cross_entropy` forward + backward (mean, ignore_index 255, default
threading, this Python process), then `losscc bench --json` of mIoU, BIoU (tol 5) and BF1
(tol 5) for every binary given, each again followed by PyTorch's cross-entropy. A loss's ratio
is its median divided by the median of the PyTorch cross-entropy blocks of the same round;
the table gives every round's ratio, so the spread shows. `losscc bench` also reports the
cross-entropy it timed in its own process (libtorch, same tensors), in the last column.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
METRICS = [("mIoU", "miou", []), ("BIoU (tol 5)", "biou", ["--set", "tol=5"]), ("BF1 (tol 5)", "bf1", ["--set", "tol=5"]),
           ("Dice", "dice", [])]


def bench_inputs(shape):
    """The tensors `losscc bench` builds: logits 2·randn, blocky labels with an ignored grid
    (images `N,C,H,W` or volumes `N,C,D,H,W`)."""
    n, c = shape[:2]
    torch.manual_seed(0)
    logits = torch.randn(shape) * 2.0
    label_shape = (n, *shape[2:])
    rank = len(label_shape)

    def axis(k):
        view = [1] * rank
        view[k] = label_shape[k]
        return torch.arange(label_shape[k]).view(view)

    periods = [(11, 5), (17, 3), (23, 1)] if rank == 4 else [(17, 3), (23, 1)]
    labels, band = axis(0), torch.zeros([1] * rank, dtype=torch.bool)
    for k, (period, weight) in enumerate(periods):
        labels = labels + (axis(k + 1) // period) * weight
        band = band | (axis(k + 1) % period == 0)
    labels = torch.where(band, torch.full_like(labels, 255), labels % c)
    return logits, labels.expand(label_shape).contiguous()


def pytorch_ce(logits, labels, iterations, warmup=2):
    x = logits.clone().requires_grad_(True)
    times = []
    for i in range(warmup + iterations):
        start = time.perf_counter()
        torch.nn.functional.cross_entropy(x, labels, ignore_index=255).backward()
        elapsed = (time.perf_counter() - start) * 1e3
        x.grad = None
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4,21,256,256")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--metrics", default="miou,biou,bf1", help="example metrics to time, of miou,biou,bf1,dice")
    parser.add_argument("--losscc", action="append", default=[],
                        help="NAME=BIN, a losscc binary to time (default: target/release/losscc)")
    args = parser.parse_args()
    binaries = [item.split("=", 1) for item in args.losscc] or [["losscc", str(ROOT / "target/release/losscc")]]
    shape = tuple(int(d) for d in args.shape.split(","))
    logits, labels = bench_inputs(shape)
    print(f"shape {shape}, torch {torch.__version__}, {torch.get_num_threads()} threads", file=sys.stderr)
    results = {}
    for round_index in range(args.rounds):
        for title, name, sets in [m for m in METRICS if m[1] in args.metrics.split(",")]:
            for label, binary in binaries:
                before = pytorch_ce(logits, labels, args.iterations)
                out = subprocess.run([binary, "bench", ROOT / "examples" / f"{name}.metric", *sets, "--shape",
                                      args.shape, "--iterations", str(args.iterations), "--json"],
                                     check=True, capture_output=True, text=True).stdout
                after = pytorch_ce(logits, labels, args.iterations)
                report = json.loads(out)
                ce = statistics.median([before, after])
                results.setdefault((title, label), []).append((report["loss_ms"], ce, report["ce_ms"]))
        print(f"round {round_index + 1} done", file=sys.stderr)
    print("| loss | binary | loss ms | PyTorch CE ms | ratio per round | libtorch CE in losscc's process ms |")
    print("|---|---|---|---|---|---|")
    for (title, label), runs in results.items():
        ratios = " / ".join(f"{loss / ce:.2f}×" for loss, ce, _ in runs)
        loss_ms = "–".join(f"{v:.0f}" for v in (min(r[0] for r in runs), max(r[0] for r in runs)))
        ce_ms = "–".join(f"{v:.1f}" for v in (min(r[1] for r in runs), max(r[1] for r in runs)))
        inner = "–".join(f"{v:.1f}" for v in (min(r[2] for r in runs), max(r[2] for r in runs)))
        print(f"| {title} | {label} | {loss_ms} | {ce_ms} | **{ratios}** | {inner} |")


if __name__ == "__main__":
    main()
