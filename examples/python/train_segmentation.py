"""Train a small U-Net-like PyTorch model on a VOC-layout folder with a losscc ONNX loss.

As a `losscc search --trainer` command it follows the trainer contract: it reads the
candidate's loss from LOSSCC_ONNX and the seed from LOSSCC_SEED, trains, and writes
`{"reward": <hold-out metric>}` to LOSSCC_RESULT:

    losscc search examples/biou.metric --target biou \\
        --trainer "python3 examples/python/train_segmentation.py --data voc --steps 300"

It also runs on its own (`--loss LOSS.onnx --result OUT.json`), or with `--loss ce` or
`--loss lovasz` for the cross-entropy and Lovász-softmax baselines. The reward is the mean IoU on the hold-out split (`holdout.txt`, else
`val.txt`), computed here with a confusion matrix; `--metric FILE.metric` instead asks losscc
for any metric of its library (`losscc eval` on the saved hold-out logits; the `losscc`
binary is `$LOSSCC_BIN`, else the one on PATH). `--save-logits DIR` keeps the test split's
logits and labels as `.npy`, so any metric can be computed afterwards.

The ONNX loss becomes a PyTorch module through onnx2torch (gradients by autograd).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from PIL import Image

IGNORE = 255


def read_split(folder, split):
    names_file = folder / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not names_file.exists():
        return None
    names = [n for n in names_file.read_text().split() if n]
    images, labels = [], []
    for name in names:
        image_path = folder / "JPEGImages" / f"{name}.jpg"
        if not image_path.exists():
            image_path = image_path.with_suffix(".png")
        image = np.asarray(Image.open(image_path).convert("RGB"), dtype=np.float32) / 255.0
        label = np.asarray(Image.open(folder / "SegmentationClass" / f"{name}.png"), dtype=np.int64)
        images.append((image.transpose(2, 0, 1) - 0.5) / 0.25)
        labels.append(label)
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels))


def block(cin, cout):
    return torch.nn.Sequential(
        torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False), torch.nn.BatchNorm2d(cout), torch.nn.ReLU(inplace=True),
        torch.nn.Conv2d(cout, cout, 3, padding=1, bias=False), torch.nn.BatchNorm2d(cout), torch.nn.ReLU(inplace=True),
    )


class UNet(torch.nn.Module):
    """Three levels, skip connections, bilinear upsampling; no pretrained weights."""

    def __init__(self, classes, width=16):
        super().__init__()
        self.down1, self.down2, self.down3 = block(3, width), block(width, 2 * width), block(2 * width, 4 * width)
        self.up2, self.up1 = block(6 * width, 2 * width), block(3 * width, width)
        self.head = torch.nn.Conv2d(width, classes, 1)

    def forward(self, x):
        d1 = self.down1(x)
        d2 = self.down2(F.max_pool2d(d1, 2))
        d3 = self.down3(F.max_pool2d(d2, 2))
        u2 = self.up2(torch.cat([F.interpolate(d3, size=d2.shape[2:], mode="bilinear", align_corners=False), d2], 1))
        u1 = self.up1(torch.cat([F.interpolate(u2, size=d1.shape[2:], mode="bilinear", align_corners=False), d1], 1))
        return self.head(u1)


def mean_iou(logits, labels, classes):
    pred = logits.argmax(1).numpy().ravel()
    true = labels.numpy().ravel()
    keep = true != IGNORE
    confusion = np.bincount(true[keep] * classes + pred[keep], minlength=classes * classes).reshape(classes, classes)
    inter = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.nanmean(inter / union))


def losscc_metric(metric, logits, labels):
    """Any metric of losscc's library, from `losscc eval` on saved logits."""
    binary = os.environ.get("LOSSCC_BIN") or shutil.which("losscc")
    if binary is None:
        sys.exit("--metric FILE needs the losscc binary: set LOSSCC_BIN or put losscc on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "logits.npy", logits.numpy().astype(np.float32))
        np.save(Path(tmp) / "labels.npy", labels.numpy())
        out = subprocess.run([binary, "eval", metric, "--logits", f"{tmp}/logits.npy", "--labels", f"{tmp}/labels.npy"],
                             capture_output=True, text=True, check=True)
    value = json.loads(out.stdout)["metric"]
    return 0.0 if value is None else float(value)


def lovasz_softmax(logits, labels):
    """Lovász-softmax (Berman et al., CVPR 2018) over the batch's valid pixels, averaged over
    the classes present in the labels: for each class, the sorted errors `|fg − p|` dotted
    with the gradient of the Lovász extension of the Jaccard loss."""
    classes = logits.shape[1]
    probabilities = logits.softmax(1).permute(0, 2, 3, 1).reshape(-1, classes)
    labels = labels.reshape(-1)
    valid = labels != IGNORE
    probabilities, labels = probabilities[valid], labels[valid]
    losses = []
    for c in range(classes):
        foreground = (labels == c).float()
        if foreground.sum() == 0:
            continue
        errors = (foreground - probabilities[:, c]).abs()
        errors, order = torch.sort(errors, descending=True)
        sorted_foreground = foreground[order]
        total = sorted_foreground.sum()
        intersection = total - sorted_foreground.cumsum(0)
        union = total + (1 - sorted_foreground).cumsum(0)
        jaccard = 1 - intersection / union
        jaccard = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
        losses.append(torch.dot(errors, jaccard))
    return torch.stack(losses).mean() if losses else logits.sum() * 0


def predict(net, images):
    net.eval()
    with torch.no_grad():
        return torch.cat([net(images[i:i + 16]) for i in range(0, len(images), 16)])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a VOC-layout folder (scripts/make_voc.py writes one)")
    parser.add_argument("--loss", default=os.environ.get("LOSSCC_ONNX"),
                        help="an ONNX loss, or `ce` / `lovasz` [default: $LOSSCC_ONNX]")
    parser.add_argument("--result", default=os.environ.get("LOSSCC_RESULT"), help="where to write {\"reward\": ...}")
    parser.add_argument("--seed", type=int, default=int(os.environ.get("LOSSCC_SEED", "0")))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=48)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--metric", default="miou", help="`miou`, or a .metric file for `losscc eval`")
    parser.add_argument("--save-logits", type=Path, help="write the test split's logits and labels here (.npy)")
    args = parser.parse_args()
    if args.loss is None:
        sys.exit("no loss: pass --loss LOSS.onnx (or `ce`, `lovasz`), or run under `losscc search --trainer`")

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train_x, train_y = read_split(args.data, "train")
    held = read_split(args.data, "holdout") or read_split(args.data, "val")
    test = read_split(args.data, "val")
    classes = int(max(train_y[train_y != IGNORE].max(), held[1][held[1] != IGNORE].max())) + 1
    if args.loss == "ce":
        loss_fn = lambda logits, labels: F.cross_entropy(logits, labels, ignore_index=IGNORE)  # noqa: E731
    elif args.loss == "lovasz":
        loss_fn = lovasz_softmax
    else:
        from onnx2torch import convert
        loss_fn = convert(onnx.load(args.loss))
    net = UNet(classes, args.width)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (1 - step / args.steps) ** 0.9)
    started = time.time()
    h, w = train_x.shape[2:]
    crop = min(args.crop, h, w)
    for step in range(args.steps):
        net.train()
        index = torch.randint(0, len(train_x), (args.batch,), generator=generator)
        top = int(torch.randint(0, h - crop + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - crop + 1, (1,), generator=generator))
        x = train_x[index, :, top:top + crop, left:left + crop]
        y = train_y[index, top:top + crop, left:left + crop]
        if torch.rand(1, generator=generator) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        loss = loss_fn(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    held_logits = predict(net, held[0])
    if args.metric == "miou":
        reward = mean_iou(held_logits, held[1], classes)
    else:
        reward = losscc_metric(args.metric, held_logits, held[1])
    if args.save_logits:
        args.save_logits.mkdir(parents=True, exist_ok=True)
        np.save(args.save_logits / "logits.npy", predict(net, test[0]).numpy().astype(np.float32))
        np.save(args.save_logits / "labels.npy", test[1].numpy())
    summary = {"reward": reward, "metric": args.metric, "steps": args.steps, "seconds": round(time.time() - started, 2),
               "final_loss": float(loss.detach())}
    if args.result:
        Path(args.result).write_text(json.dumps({"reward": reward}) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
