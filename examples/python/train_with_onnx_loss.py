"""Train a PyTorch model with a losscc ONNX loss, either way PyTorch can load one.

    losscc compile examples/miou.metric --grad -o miou.grad.onnx   # loss and gradient graph
    .venv/bin/python examples/python/train_with_onnx_loss.py miou.grad.onnx [--steps 300]

    losscc compile examples/miou.metric -o miou.onnx               # forward graph only
    .venv/bin/python examples/python/train_with_onnx_loss.py miou.onnx

A gradient graph (output `dloss_dlogits`) runs in ONNX Runtime through `losscc_torch.OnnxLoss`
(a `torch.autograd.Function`, no onnx2torch); a forward-only graph is converted with
onnx2torch and differentiated by PyTorch's autograd.

The data are synthetic: noisy images of coloured discs and bars whose class is their
colour. Every 50 steps the script prints the surrogate loss and the held-out mIoU (computed
here with a confusion matrix, independently of losscc). The last line is a JSON summary.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx2torch import convert

CLASSES, SIZE = 4, 32
PALETTE = torch.tensor([[0.1, 0.1, 0.1], [0.9, 0.2, 0.2], [0.2, 0.9, 0.2], [0.2, 0.2, 0.9]])


def synthetic(n, generator):
    ys = torch.arange(SIZE).view(1, SIZE, 1).float()
    xs = torch.arange(SIZE).view(1, 1, SIZE).float()
    labels = torch.zeros(n, SIZE, SIZE, dtype=torch.long)
    for cls in range(1, CLASSES):
        centre = torch.rand(n, 2, 1, 1, generator=generator) * SIZE
        radius = torch.rand(n, 1, 1, generator=generator) * 6 + 3
        dy, dx = ys - centre[:, 0], xs - centre[:, 1]
        inside = (dy ** 2 + dx ** 2 <= radius ** 2) if cls % 2 else ((dy.abs() <= radius) & (dx.abs() <= 1.5))
        labels[inside] = cls
    images = PALETTE[labels].permute(0, 3, 1, 2)
    images = images + 0.35 * torch.randn(images.shape, generator=generator)
    return images, labels


def miou(logits, labels):
    pred = logits.argmax(1).numpy().ravel()
    true = labels.numpy().ravel()
    confusion = np.bincount(true * CLASSES + pred, minlength=CLASSES * CLASSES).reshape(CLASSES, CLASSES)
    inter = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - inter
    with np.errstate(invalid="ignore"):
        return float(np.nanmean(inter / union))


def load_loss(path):
    """The loss as a module, and which route it takes."""
    model = onnx.load(path)
    if "dloss_dlogits" in [o.name for o in model.graph.output]:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from losscc_torch import OnnxLoss
        return OnnxLoss(path), "its gradient graph in ONNX Runtime (losscc_torch.OnnxLoss)"
    return convert(model), "onnx2torch and PyTorch autograd"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a loss compiled with `losscc compile`")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    train_x, train_y = synthetic(64, generator)
    test_x, test_y = synthetic(32, generator)
    loss_fn, route = load_loss(args.model)  # a torch.nn.Module: loss = loss_fn(logits, labels)
    print(f"loss {args.model} through {route}")
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, CLASSES, 3, padding=1),
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    with torch.no_grad():
        start = miou(net(test_x), test_y)
    print(f"step    0  loss      -  held-out mIoU {start:.4f}")
    history = [start]
    for step in range(1, args.steps + 1):
        index = torch.randint(0, 64, (16,), generator=generator)
        loss = loss_fn(net(train_x[index]), train_y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps:
            with torch.no_grad():
                score = miou(net(test_x), test_y)
            history.append(score)
            print(f"step {step:4d}  loss {loss.item():.4f}  held-out mIoU {score:.4f}")
    print(json.dumps({"start_miou": start, "final_miou": history[-1], "steps": args.steps, "route": route}))


if __name__ == "__main__":
    main()
