"""The ONNX losses as other frameworks see them.

Every case of the back-end corpus (the example library and `tests/corpus/`, see its README)
is compiled with random curves (with `--volumes` for `N,C,D,H,W` shapes and `--soft-labels`
for multi-hot and soft labels, which are float32 of the logits' shape); the model must pass `onnx.checker`'s full check, give the tch
loss (`losscc eval`) in ONNX Runtime, and convert with onnx2torch, without a warning, into a
PyTorch module whose value and autograd gradient equal tch's. Run by `make test`:

    .venv/bin/python -m unittest discover -s tests/python -v
"""

import json
import os
import subprocess
import sys
import tempfile
import unittest
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from onnx2torch import convert

ROOT = Path(__file__).resolve().parents[2]
LOSSCC = Path(os.environ.get("LOSSCC", ROOT / "target" / "release" / "losscc"))


def losscc(*args):
    result = subprocess.run([str(LOSSCC), *map(str, args)], capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"losscc {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result.stdout


class Case:
    """One corpus case: its file, overrides, ignore label and how its inputs are made."""

    def __init__(self, path):
        self.path = path
        self.name = path.stem
        self.shape = (2, 5, 19, 23)
        self.seed = sum(path.stem.encode()) * 7919
        self.scale = 3.0
        self.ignore = 255
        self.ignored = 0.1
        self.labels = "classes"
        self.sets = []
        for line in path.read_text().splitlines():
            if not line.startswith("#") or line.startswith("##"):
                break
            if line.startswith("# corpus:"):
                for item in line[len("# corpus:"):].split():
                    key, value = item.split("=")
                    if key == "shape":
                        self.shape = tuple(int(d) for d in value.split(","))
                        assert len(self.shape) in (4, 5), f"{path}: shape is N,C,H,W or N,C,D,H,W"
                    elif key == "seed":
                        self.seed = int(value)
                    elif key == "scale":
                        self.scale = float(value)
                    elif key == "ignore":
                        self.ignore = None if value == "none" else int(value)
                    elif key == "ignored":
                        self.ignored = float(value)
                    elif key == "labels":
                        assert value in ("classes", "binary", "multihot", "soft"), f"{path}: labels={value}"
                        self.labels = value
                    else:
                        raise AssertionError(f"{path}: unknown corpus key `{key}`")
            elif line.startswith("# set:"):
                self.sets = line[len("# set:"):].split()

    @property
    def volumes(self):
        return len(self.shape) == 5

    @property
    def channel_labels(self):
        """Labels of the logits' shape (multi-hot or soft), float32."""
        return self.labels in ("multihot", "soft")

    def flags(self):
        """Overrides and the ignore label (`losscc eval` and `compile`)."""
        flags = []
        for item in self.sets:
            flags += ["--set", item]
        flags += ["--ignore-label", "none" if self.ignore is None else str(self.ignore)]
        return flags

    def compile_flags(self):
        """`flags()` and the graph's input form: `--volumes`, `--soft-labels`."""
        return self.flags() + ["--volumes"] * self.volumes + ["--soft-labels"] * self.channel_labels

    def facts(self, classes="C"):
        """The graph inputs as tract states them: logits, then labels."""
        spatial = "D,H,W" if self.volumes else "H,W"
        labels = f"N,{classes},{spatial},f32" if self.channel_labels else f"N,{spatial},i64"
        return [f"N,{classes},{spatial},f32", labels]

    def other_shape(self, classes):
        """A second, smaller shape for the same graph (symbolic N, D, H, W)."""
        return (1, classes, 3, 5, 6) if self.volumes else (1, classes, 9, 11)

    def inputs(self, shape):
        """Logits uniform in [-scale, scale] and blocky labels of the case's form, `ignored`
        of the pixels ignored: class indices (or 0 and 1) with the ignore label, multi-hot
        channels with the ignore label in one channel, or soft labels all 0."""
        rng = np.random.default_rng(self.seed)
        n, c = shape[:2]
        logits = rng.uniform(-self.scale, self.scale, size=shape).astype(np.float32)
        grid = np.mgrid[tuple(slice(0, d) for d in shape[2:])]
        zs, (ys, xs) = (grid[0], grid[1:]) if self.volumes else (0, grid)
        bh, bw = rng.integers(1, 5), rng.integers(2, 6)
        bd = rng.integers(1, 4) if self.volumes else 1
        blocks = np.stack([zs // bd + ys // bh + 2 * (xs // bw) + i for i in range(n)])
        if self.labels in ("classes", "binary"):
            labels = (blocks % (2 if self.labels == "binary" else c)).astype(np.int64)
            if self.ignore is not None:
                labels[rng.random(labels.shape) < self.ignored] = self.ignore
        elif self.labels == "multihot":
            # Overlapping blocks: a pixel may carry several channels, or none.
            k = np.arange(c).reshape((1, c) + (1,) * (len(shape) - 2))
            on = ((blocks[:, None] + k) % 3 == 0) | (((ys // bh + xs // bw)[None, None] + k) % 4 == 0)
            labels = on.astype(np.float32)
            if self.ignore is not None:
                ignored = np.argwhere(rng.random(blocks.shape) < self.ignored)
                channels = rng.integers(0, c, len(ignored))
                labels[(ignored[:, 0], channels, *ignored[:, 1:].T)] = self.ignore
        else:
            # Each pixel's blocky class holds at least 0.6 (a clear argmax), the rest is spread
            # at random; ignored pixels are all 0.
            spread = rng.random(shape) + 1e-3
            hard = np.moveaxis(np.eye(c)[blocks % c], -1, 1)
            labels = 0.6 * hard + 0.4 * spread / spread.sum(axis=1, keepdims=True)
            labels[np.broadcast_to((rng.random(blocks.shape) < self.ignored)[:, None], shape)] = 0.0
            labels = labels.astype(np.float32)
        return logits, labels


def corpus():
    files = sorted((ROOT / "examples").glob("*.metric")) + sorted((ROOT / "tests" / "corpus").glob("*.metric"))
    return [Case(path) for path in files]


def random_curves(pieces, rng):
    """Monotone control points for curves of the given pieces (the search's mapping)."""
    curves = []
    for k in pieces:
        previous = np.zeros(2)
        flat = []
        for _ in range(2 * k - 1):
            point = previous + rng.uniform(0.05, 0.95, size=2) * (1.0 - previous)
            flat += [float(point[0]), float(point[1])]
            previous = point
        curves.append(flat)
    return curves


def metadata(model):
    return {p.key: p.value for p in model.metadata_props}


class CorpusThroughOnnxTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="losscc-py-"))

    def compile_case(self, case, rng):
        """Compile with identity curves to learn the manifest, then with random curves."""
        first = self.tmp / f"{case.name}.identity.onnx"
        losscc("compile", case.path, "-o", first, *case.compile_flags())
        pieces = [c["pieces"] for c in json.loads(metadata(onnx.load(str(first)))["losscc.curves"])]
        params = self.tmp / f"{case.name}.params.json"
        params.write_text(json.dumps({"control_points": random_curves(pieces, rng)}))
        model_path = self.tmp / f"{case.name}.onnx"
        losscc("compile", case.path, "-o", model_path, "--params", params, *case.compile_flags())
        return model_path, params

    def tch_reference(self, case, params, logits, labels):
        np.save(self.tmp / "logits.npy", logits)
        np.save(self.tmp / "labels.npy", labels)
        grad_path = self.tmp / "grad.npy"
        out = json.loads(losscc("eval", case.path, "--logits", self.tmp / "logits.npy", "--labels",
                                self.tmp / "labels.npy", "--params", params, "--grad", grad_path, *case.flags()))
        return out["loss"], np.load(grad_path)

    def test_every_case(self):
        cases = corpus()
        self.assertGreaterEqual(len(cases), 20)
        for case in cases:
            with self.subTest(case=case.name):
                model_path, params = self.compile_case(case, np.random.default_rng(case.seed + 11))
                model = onnx.load(str(model_path))
                onnx.checker.check_model(model, full_check=True)
                self.assertEqual(model.opset_import[0].version, 17)
                self.assertEqual(model.ir_version, 8)
                meta = metadata(model)
                self.assertEqual(json.loads(meta["losscc.ignore_label"]), case.ignore)
                sources = json.loads(meta["losscc.sources"])
                self.assertEqual(sources[0]["text"], case.path.read_text())

                logits, labels = case.inputs(case.shape)
                tch_loss, tch_grad = self.tch_reference(case, params, logits, labels)
                tolerance = 1e-5 * max(abs(tch_loss), 1.0)

                session = onnxruntime.InferenceSession(str(model_path))
                (ort_loss,) = session.run(None, {"logits": logits, "labels": labels})
                self.assertEqual(ort_loss.shape, ())
                self.assertLess(abs(float(ort_loss) - tch_loss), tolerance)

                # onnx2torch converts and runs our graphs without a single warning (no
                # constructs PyTorch deprecates, such as its list-indexed `Slice`).
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    module = convert(model)
                    x = torch.from_numpy(logits.copy()).requires_grad_(True)
                    torch_loss = module(x, torch.from_numpy(labels))
                    if torch_loss.requires_grad:
                        torch_loss.backward()
                        grad = x.grad.numpy()
                    else:
                        grad = np.zeros_like(logits)
                self.assertEqual([str(w.message) for w in caught], [])
                self.assertLess(abs(torch_loss.item() - tch_loss), tolerance)
                self.assertTrue(np.isfinite(grad).all())
                scale = max(np.abs(tch_grad).max(), 1e-6)
                np.testing.assert_allclose(grad, tch_grad, rtol=0, atol=1e-4 * scale)

    def test_one_model_many_shapes(self):
        case = Case(ROOT / "examples" / "biou.metric")
        case.sets = ["tol=2"]
        model_path, params = self.compile_case(case, np.random.default_rng(3))
        session = onnxruntime.InferenceSession(str(model_path))
        for shape in [(1, 3, 8, 8), (3, 5, 17, 9), (2, 2, 31, 40)]:
            logits, labels = case.inputs(shape)
            (loss,) = session.run(None, {"logits": logits, "labels": labels})
            expected, _ = self.tch_reference(case, params, logits, labels)
            self.assertLess(abs(float(loss) - expected), 1e-5 * max(abs(expected), 1.0), shape)

    def test_exact_counts_graph(self):
        model_path = self.tmp / "miou_exact.onnx"
        losscc("compile", ROOT / "examples" / "miou.metric", "--exact", "-o", model_path)
        model = onnx.load(str(model_path))
        onnx.checker.check_model(model, full_check=True)
        logits, labels = Case(ROOT / "examples" / "miou.metric").inputs((2, 4, 12, 10))
        session = onnxruntime.InferenceSession(str(model_path))
        outputs = dict(zip([o.name for o in session.get_outputs()],
                           session.run(None, {"logits": logits, "labels": labels})))
        accumulators = json.loads(metadata(model)["losscc.accumulators"])
        self.assertEqual(len(accumulators), 2)  # intersection and union counts
        inter, union = (outputs[a["output"]] for a in accumulators)
        # The same numbers computed directly in numpy.
        pred = logits.argmax(1)
        valid = labels != 255
        expected_inter = [np.sum((pred == c) & (labels == c) & valid) for c in range(4)]
        expected_union = [np.sum(((pred == c) | (labels == c)) & valid) for c in range(4)]
        np.testing.assert_array_equal(inter, expected_inter)
        np.testing.assert_array_equal(union, expected_union)
        np.save(self.tmp / "logits.npy", logits)
        np.save(self.tmp / "labels.npy", labels)
        reference = json.loads(losscc("eval", ROOT / "examples" / "miou.metric",
                                      "--logits", self.tmp / "logits.npy", "--labels", self.tmp / "labels.npy"))
        self.assertAlmostEqual(float(np.mean(inter / union)), reference["metric"], places=6)


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
        published = [c for c in cases if c["case"] == 0]
        self.assertEqual(len(published), 6)
        for case in published:
            metric = ROOT / "examples" / f"{case['metric']}.metric"
            logits, labels = Case(metric).inputs((2, 4, 12, 10))
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
            # onnx2torch loads it too, with the baked model's gradient.
            baked_module = convert(onnx.load(str(baked)))
            x_baked = torch.from_numpy(logits.copy()).requires_grad_(True)
            baked_module(x_baked, torch.from_numpy(labels)).backward()
            module = convert(model)
            x = torch.from_numpy(logits.copy()).requires_grad_(True)
            value = module(x, torch.from_numpy(labels), torch.from_numpy(flat))
            value.backward()
            self.assertAlmostEqual(value.item(), float(expected), delta=1e-5 * max(abs(float(expected)), 1e-3))
            scale = max(x_baked.grad.abs().max().item(), 1e-6)
            np.testing.assert_allclose(x.grad.numpy(), x_baked.grad.numpy(), rtol=0, atol=1e-4 * scale)


if __name__ == "__main__":
    unittest.main()
