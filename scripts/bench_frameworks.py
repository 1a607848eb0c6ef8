"""Forward + backward of a losscc loss in each framework route, as ratios to PyTorch's own
cross-entropy measured in the same run (docs/performance.md, "The ONNX routes").

    .venv/bin/python scripts/bench_frameworks.py [--shape 4,21,256,256] [--iterations 10]

For each metric (mIoU, BIoU tol 5, BF1 tol 5, identity curves) it times, interleaved
iteration by iteration on the same tensors, after a warm-up:
* `torch.nn.functional.cross_entropy` (mean, ignore_index 255) forward + backward, with
  PyTorch's default threading: the yardstick;
* the gradient graph (`losscc compile --grad`) in ONNX Runtime through
  `losscc_torch.OnnxLoss` (I/O binding, default intra-op threads);
* the forward graph through onnx2torch, differentiated by PyTorch autograd;
and runs `losscc bench --json` on the same shape for the tch fast path (its own loss and
libtorch cross-entropy medians, reported beside). Prints a markdown table.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx2torch import convert

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "python"))
from losscc_torch import OnnxLoss  # noqa: E402

METRICS = [("mIoU", "miou", []), ("BIoU (tol 5)", "biou", ["--set", "tol=5"]), ("BF1 (tol 5)", "bf1", ["--set", "tol=5"])]


def inputs(shape):
    n, c, h, w = shape
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(shape, generator=generator) * 2.0
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    labels = torch.stack([((ys // 16) + 2 * (xs // 24) + i) % c for i in range(n)]).long()
    labels[:, ::17, ::13] = 255
    return logits, labels


def timed(step):
    start = time.perf_counter()
    step()
    return (time.perf_counter() - start) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4,21,256,256")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--losscc", default=str(ROOT / "target" / "release" / "losscc"))
    args = parser.parse_args()
    shape = tuple(int(d) for d in args.shape.split(","))
    logits, labels = inputs(shape)
    tmp = Path(tempfile.mkdtemp(prefix="losscc-bench-"))
    print(f"shape {shape}, {args.iterations} iterations after {args.warmup}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)

    rows = []
    for title, name, sets in METRICS:
        metric = ROOT / "examples" / f"{name}.metric"
        grad_graph, forward_graph = tmp / f"{name}.grad.onnx", tmp / f"{name}.onnx"
        for extra, path in ((["--grad"], grad_graph), ([], forward_graph)):
            subprocess.run([args.losscc, "compile", metric, *extra, *sets, "-o", path], check=True, capture_output=True)
        gradient_loss = OnnxLoss(grad_graph)
        converted = convert(onnx.load(str(forward_graph)))

        def backward_of(loss_fn):
            def step():
                x = logits.clone().requires_grad_(True)
                loss_fn(x, labels).backward()
            return step

        routes = {
            "cross-entropy": backward_of(lambda x, y: torch.nn.functional.cross_entropy(x, y, ignore_index=255)),
            "gradient graph in ONNX Runtime": backward_of(gradient_loss),
            "onnx2torch + autograd": backward_of(converted),
        }
        times = {route: [] for route in routes}
        for iteration in range(args.warmup + args.iterations):
            for route, step in routes.items():
                elapsed = timed(step)
                if iteration >= args.warmup:
                    times[route].append(elapsed)
        medians = {route: statistics.median(values) for route, values in times.items()}
        bench = subprocess.run([args.losscc, "bench", metric, *sets, "--shape", args.shape, "--json",
                                "--iterations", str(args.iterations), "--warmup", str(args.warmup)],
                               check=True, capture_output=True, text=True)
        tch = json.loads(bench.stdout)
        ce = medians["cross-entropy"]
        rows.append((title, ce, medians["gradient graph in ONNX Runtime"], medians["onnx2torch + autograd"],
                     tch["loss_ms"], tch["ce_ms"]))
        print(f"{title}: done", file=sys.stderr)

    print("| loss | PyTorch CE ms | gradient graph in ORT | onnx2torch + autograd | tch fast path (libtorch CE in its process) |")
    print("|---|---|---|---|---|")
    for title, ce, ort_ms, o2t_ms, tch_ms, tch_ce in rows:
        print(f"| {title} | {ce:.1f} | {ort_ms:.0f} ms, **{ort_ms / ce:.1f}×** | {o2t_ms:.0f} ms, **{o2t_ms / ce:.1f}×** "
              f"| {tch_ms:.0f} ms, **{tch_ms / ce:.1f}×** ({tch_ce:.1f} ms) |")


if __name__ == "__main__":
    main()
