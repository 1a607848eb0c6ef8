"""Measure `losscc search` throughput: candidates per hour for the quick preset with the
local executor at 1 and 2 workers and under Slurm, and the Slurm executor's overhead per
round (submit to first task start; last task end to the next submit), from the journals.

    python3 scripts/throughput.py [--losscc target/release/losscc] [--out out/throughput] [--rounds 2]

Every run uses the same seed and one thread per model, so all journal the same rewards
(checked). Prints a Markdown table for docs/performance.md.
"""

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(losscc, out, executor, workers, rounds):
    shutil.rmtree(out, ignore_errors=True)
    command = [losscc, "search", str(ROOT / "examples" / "biou.metric"), "--preset", "quick", "--rounds", str(rounds),
               "--out", str(out), "--executor", executor, "--threads-per-model", "1"]
    if executor == "local":
        command += ["--workers", str(workers)]
    started = time.time()
    subprocess.run(command, check=True, capture_output=True)
    wall = time.time() - started
    lines = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    finished = [line for line in lines if isinstance(line.get("reward"), (int, float))]
    arrays = [line for line in lines if line.get("event") == "slurm_array"]
    return wall, finished, arrays


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--losscc", default=str(ROOT / "target" / "release" / "losscc"))
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "throughput")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rows, rewards = [], {}
    for name, executor, workers in [("local, 1 worker", "local", 1), ("local, 2 workers", "local", 2),
                                    ("slurm (one-node, 2 CPUs)", "slurm", 0)]:
        wall, finished, arrays = run(args.losscc, args.out / executor / str(workers), executor, workers, args.rounds)
        rewards[name] = sorted((c["round"], c["sample"], c["reward"]) for c in finished)
        per_hour = len(finished) / wall * 3600
        mean_task = sum(c["seconds"] for c in finished) / len(finished)
        overhead = ""
        if arrays:
            starts, gaps = [], []
            for index, array in enumerate(arrays):
                round_tasks = [c for c in finished if c["round"] == array["round"]]
                starts.append(min(c["started"] for c in round_tasks) - array["submitted"])
                if index + 1 < len(arrays):
                    gaps.append(arrays[index + 1]["submitted"] - max(c["finished"] for c in round_tasks))
            overhead = (f"submit → first task start {sum(starts) / len(starts):.1f} s; "
                        f"last task end → next submit {sum(gaps) / max(len(gaps), 1):.1f} s")
        rows.append(f"| {name} | {len(finished)} | {wall:.0f} | {per_hour:.0f} | {mean_task:.1f} | {overhead} |")
    same = len({json.dumps(r) for r in rewards.values()}) == 1
    print("| executor | candidates | wall seconds | candidates per hour | seconds per candidate | Slurm overhead per round |")
    print("|---|---:|---:|---:|---:|---|")
    print("\n".join(rows))
    print(f"\nAll runs journaled the same rewards: {same}.")


if __name__ == "__main__":
    main()
