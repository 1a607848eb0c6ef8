"""Whether the loss slows the network beside it: `losscc train` and a search round, timed for
several `losscc` binaries in alternation (docs/performance.md, "The loss's threading and
libtorch's").

    .venv/bin/python scripts/bench_train.py [--rounds 3] [--iters 150] [--search] NAME=BIN ...

Each round runs, for every binary in turn: `train --loss ce`, `train examples/biou.metric`
(the BIoU surrogate through the fused kernel) and, with `--search`, one quick search round
(`search examples/biou.metric --preset quick --rounds 1`, 6 candidates). Wall seconds of
each command, per round, so the spread shows; the process environment is left as it is
(libtorch's default threading).
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(command):
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("binaries", nargs="+", help="NAME=BIN, a losscc binary to time")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=150)
    parser.add_argument("--search", action="store_true", help="also time one quick search round")
    args = parser.parse_args()
    binaries = [item.split("=", 1) for item in args.binaries]
    runs = [("train --loss ce", lambda b, out: [b, "train", "--loss", "ce", "--iters", str(args.iters)]),
            ("train BIoU surrogate", lambda b, out: [b, "train", str(ROOT / "examples/biou.metric"),
                                                     "--iters", str(args.iters)])]
    if args.search:
        runs.append(("search round (6 candidates)", lambda b, out: [
            b, "search", str(ROOT / "examples/biou.metric"), "--preset", "quick", "--rounds", "1", "--out", out]))
    times = {}
    for round_index in range(args.rounds):
        for title, command in runs:
            for name, binary in binaries:
                with tempfile.TemporaryDirectory() as out:
                    times.setdefault((title, name), []).append(timed(command(binary, str(Path(out) / "search"))))
        print(f"round {round_index + 1} done", file=sys.stderr)
    print("| run | " + " | ".join(name for name, _ in binaries) + " |")
    print("|---|" + "---|" * len(binaries))
    for title, _ in runs:
        cells = [" / ".join(f"{t:.2f}" for t in times[(title, name)]) + " s" for name, _ in binaries]
        print(f"| {title} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
