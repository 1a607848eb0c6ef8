"""Print the seven exact metrics of several `losscc train` JSON outputs side by side.

Usage: python3 scripts/side_by_side.py NAME=RESULT.json [NAME=RESULT.json ...]
"""

import json
import sys

METRICS = ["miou", "fwiou", "macc", "gacc", "biou", "bf1", "boundary_iou"]


def main():
    columns = []
    for argument in sys.argv[1:]:
        name, _, path = argument.partition("=")
        with open(path) as f:
            columns.append((name, json.load(f)))
    if not columns:
        sys.exit(__doc__)
    width = max(12, *(len(name) for name, _ in columns))
    print("metric (test split, %)".ljust(24) + "".join(name.rjust(width + 2) for name, _ in columns))
    for metric in METRICS:
        print(metric.ljust(24) + "".join(f"{result[metric] * 100:.2f}".rjust(width + 2) for _, result in columns))
    print("training seconds".ljust(24) + "".join(f"{result['training_seconds']:.1f}".rjust(width + 2) for _, result in columns))


if __name__ == "__main__":
    main()
