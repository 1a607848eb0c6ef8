"""The ONNX losses as other frameworks see them.

For every example metric, `losscc compile` output must pass `onnx.checker`'s full check, give
the tch loss (`losscc eval`) in ONNX Runtime, and convert with onnx2torch into a PyTorch
module whose autograd gradient equals the tch gradient. Run by `make test`:

    .venv/bin/python -m unittest discover -s tests/python -v
"""

import json
import os
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from onnx2torch import convert

ROOT = Path(__file__).resolve().parents[2]
LOSSCC = Path(os.environ.get("LOSSCC", ROOT / "target" / "release" / "losscc"))
EXAMPLES = sorted((ROOT / "examples").glob("*.metric"))


def make_inputs(rng, shape):
    """Random logits and blocky labels with a few ignored pixels."""
    n, c, h, w = shape
    logits = rng.normal(0.0, 2.0, size=shape).astype(np.float32)
    ys, xs = np.mgrid[0:h, 0:w]
    labels = np.stack([((ys // 3 + xs // 4 + i) % c) for i in range(n)]).astype(np.int64)
    labels[rng.random(labels.shape) < 0.05] = 255
    return logits, labels


def losscc(*args):
    result = subprocess.run([str(LOSSCC), *map(str, args)], capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"losscc {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result.stdout


class OnnxLossTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="losscc-py-"))
        rng = np.random.default_rng(7)
        cls.logits, cls.labels = make_inputs(rng, (2, 4, 12, 10))
        np.save(cls.tmp / "logits.npy", cls.logits)
        np.save(cls.tmp / "labels.npy", cls.labels)

    def test_examples_exist(self):
        self.assertGreaterEqual(len(EXAMPLES), 12)

    def test_every_example(self):
        for metric in EXAMPLES:
            with self.subTest(metric=metric.name):
                model_path = self.tmp / f"{metric.stem}.onnx"
                losscc("compile", metric, "-o", model_path)
                model = onnx.load(str(model_path))
                onnx.checker.check_model(model, full_check=True)
                self.assertEqual(model.opset_import[0].version, 17)
                self.assertEqual(model.ir_version, 8)
                metadata = {p.key: p.value for p in model.metadata_props}
                self.assertIn("metric", metadata["losscc.source"])
                self.assertIsInstance(json.loads(metadata["losscc.curves"]), list)

                grad_path = self.tmp / f"{metric.stem}.grad.npy"
                reference = json.loads(
                    losscc("eval", metric, "--logits", self.tmp / "logits.npy",
                           "--labels", self.tmp / "labels.npy", "--grad", grad_path)
                )
                tch_loss = reference["loss"]
                tch_grad = np.load(grad_path)

                session = onnxruntime.InferenceSession(str(model_path))
                (ort_loss,) = session.run(None, {"logits": self.logits, "labels": self.labels})
                self.assertEqual(ort_loss.shape, ())
                self.assertLess(abs(float(ort_loss) - tch_loss), 1e-5 * max(abs(tch_loss), 1e-3))

                module = convert(model)
                logits = torch.from_numpy(self.logits.copy()).requires_grad_(True)
                torch_loss = module(logits, torch.from_numpy(self.labels))
                torch_loss.backward()
                self.assertLess(abs(torch_loss.item() - tch_loss), 1e-5 * max(abs(tch_loss), 1e-3))
                grad = logits.grad.numpy()
                self.assertTrue(np.isfinite(grad).all())
                scale = max(np.abs(tch_grad).max(), 1e-6)
                np.testing.assert_allclose(grad, tch_grad, rtol=0, atol=1e-4 * scale)

    def test_one_model_many_shapes(self):
        model_path = self.tmp / "biou_shapes.onnx"
        losscc("compile", ROOT / "examples" / "biou.metric", "-o", model_path, "--set", "tol=2")
        session = onnxruntime.InferenceSession(str(model_path))
        rng = np.random.default_rng(3)
        for shape in [(1, 3, 8, 8), (3, 5, 17, 9), (2, 2, 31, 40)]:
            logits, labels = make_inputs(rng, shape)
            (loss,) = session.run(None, {"logits": logits, "labels": labels})
            self.assertTrue(0.0 <= float(loss) <= 1.0, (shape, loss))

    def test_exact_counts_graph(self):
        model_path = self.tmp / "miou_exact.onnx"
        losscc("compile", ROOT / "examples" / "miou.metric", "--exact", "-o", model_path)
        model = onnx.load(str(model_path))
        onnx.checker.check_model(model, full_check=True)
        session = onnxruntime.InferenceSession(str(model_path))
        outputs = dict(zip([o.name for o in session.get_outputs()],
                           session.run(None, {"logits": self.logits, "labels": self.labels})))
        accumulators = json.loads({p.key: p.value for p in model.metadata_props}["losscc.accumulators"])
        self.assertEqual(len(accumulators), 2)  # intersection and union counts
        inter, union = (outputs[a["output"]] for a in accumulators)
        # The same numbers computed directly in numpy.
        pred = self.logits.argmax(1)
        valid = self.labels != 255
        expected_inter = [np.sum((pred == c) & (self.labels == c) & valid) for c in range(4)]
        expected_union = [np.sum(((pred == c) | (self.labels == c)) & valid) for c in range(4)]
        np.testing.assert_array_equal(inter, expected_inter)
        np.testing.assert_array_equal(union, expected_union)
        reference = json.loads(losscc("eval", ROOT / "examples" / "miou.metric",
                                      "--logits", self.tmp / "logits.npy", "--labels", self.tmp / "labels.npy"))
        self.assertAlmostEqual(float(np.mean(inter / union)), reference["metric"], places=6)


if __name__ == "__main__":
    unittest.main()


class TrainingExampleTest(unittest.TestCase):
    def test_training_with_the_onnx_loss_raises_miou(self):
        tmp = Path(tempfile.mkdtemp(prefix="losscc-train-"))
        losscc("compile", ROOT / "examples" / "miou.metric", "-o", tmp / "miou.onnx")
        script = ROOT / "examples" / "python" / "train_with_onnx_loss.py"
        result = subprocess.run([sys.executable, str(script), str(tmp / "miou.onnx"), "--steps", "300"],
                                capture_output=True, text=True, timeout=600)
        self.assertEqual(result.returncode, 0, result.stderr)
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        self.assertGreater(summary["final_miou"], summary["start_miou"] + 0.3, result.stdout)


class CurvesInputTest(unittest.TestCase):
    def test_curves_as_an_input_match_baked_curves(self):
        tmp = Path(tempfile.mkdtemp(prefix="losscc-curves-"))
        cases = json.loads((ROOT / "tests" / "data" / "asl-vectors" / "cases.json").read_text())["cases"]
        rng = np.random.default_rng(5)
        logits, labels = make_inputs(rng, (2, 4, 12, 10))
        for case in [c for c in cases if c["case"] == 0]:
            metric = ROOT / "examples" / f"{case['metric']}.metric"
            params = tmp / f"{case['metric']}.json"
            params.write_text(json.dumps({"control_points": case["control_points"]}))
            baked, dynamic = tmp / f"{case['metric']}.onnx", tmp / f"{case['metric']}.dyn.onnx"
            sets = ["--set", "tol=1", "--set", "drop_bg=false"] if case["metric"] in ("biou", "bf1") else []
            losscc("compile", metric, "-o", baked, "--params", params, *sets)
            losscc("compile", metric, "-o", dynamic, "--curves-input", *sets)
            model = onnx.load(str(dynamic))
            onnx.checker.check_model(model, full_check=True)
            flat = np.concatenate([np.asarray(c, dtype=np.float32) for c in case["control_points"]])
            (expected,) = onnxruntime.InferenceSession(str(baked)).run(None, {"logits": logits, "labels": labels})
            (got,) = onnxruntime.InferenceSession(str(dynamic)).run(
                None, {"logits": logits, "labels": labels, "curves": flat})
            self.assertAlmostEqual(float(got), float(expected), delta=1e-5 * max(abs(float(expected)), 1e-3),
                                   msg=case["metric"])
            # onnx2torch loads it too, with finite gradients.
            module = convert(model)
            x = torch.from_numpy(logits.copy()).requires_grad_(True)
            value = module(x, torch.from_numpy(labels), torch.from_numpy(flat))
            value.backward()
            self.assertAlmostEqual(value.item(), float(expected), delta=1e-5 * max(abs(float(expected)), 1e-3))
            self.assertTrue(torch.isfinite(x.grad).all())
