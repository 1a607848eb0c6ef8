"""The shipped PyTorch trainer (`examples/python/train_segmentation.py`) as a
`losscc search --trainer` command, on a VOC-layout folder made by `scripts/make_voc.py`:
every candidate's reward in the journal is the hold-out mIoU the trainer computed with the
candidate's ONNX loss, and a candidate trained with better curves is not worse than chance.
"""

import json
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOSSCC = ROOT / "target" / "release" / "losscc"
TRAINER = ROOT / "examples" / "python" / "train_segmentation.py"


class TrainerCommandTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="losscc-trainer-"))
        cls.voc = cls.tmp / "voc"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_voc.py"), str(cls.voc), "--train", "16",
                        "--val", "8", "--holdout", "8", "--size", "48"], check=True, capture_output=True)

    def test_the_trainer_rewards_every_candidate_of_a_search(self):
        out = self.tmp / "search"
        command = f"{sys.executable} -W ignore {TRAINER} --data {self.voc} --steps 15 --batch 4 --crop 32"
        result = subprocess.run([str(LOSSCC), "search", str(ROOT / "examples" / "miou.metric"), "--out", str(out),
                                 "--trainer", command, "--rounds", "1", "--samples", "2", "--workers", "2"],
                                capture_output=True, text=True, timeout=600)
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
        self.assertEqual(len(lines), 2)
        for line in lines:
            folder = out / "candidates" / f"{line['round']}-{line['sample']}" / "attempt-1"
            summary = json.loads((folder / "trainer.stdout").read_text().splitlines()[-1])
            self.assertEqual(summary["reward"], line["reward"])
            self.assertTrue(0.0 < line["reward"] <= 1.0, line)
            self.assertEqual(json.loads((folder / "result.json").read_text())["reward"], line["reward"])
            self.assertEqual((folder / "trainer.status").read_text().strip(), "0")

    def test_the_trainer_runs_on_its_own_with_cross_entropy(self):
        result_path = self.tmp / "ce.json"
        result = subprocess.run([sys.executable, "-W", "ignore", str(TRAINER), "--data", str(self.voc), "--loss", "ce",
                                 "--steps", "30", "--batch", "4", "--crop", "32", "--result", str(result_path),
                                 "--save-logits", str(self.tmp / "logits")],
                                capture_output=True, text=True, timeout=600)
        self.assertEqual(result.returncode, 0, result.stderr)
        reward = json.loads(result_path.read_text())["reward"]
        self.assertGreater(reward, 0.1)
        # The saved test logits give losscc's own exact mIoU of the same predictions.
        out = json.loads(subprocess.run([str(LOSSCC), "eval", str(ROOT / "examples" / "miou.metric"), "--logits",
                                         str(self.tmp / "logits" / "logits.npy"), "--labels",
                                         str(self.tmp / "logits" / "labels.npy")],
                                        capture_output=True, text=True, check=True).stdout)
        self.assertTrue(0.0 < out["metric"] <= 1.0)


if __name__ == "__main__":
    unittest.main()
