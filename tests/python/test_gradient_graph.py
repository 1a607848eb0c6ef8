"""The gradient graph (`losscc compile FILE --grad`) in every framework it serves.

For every case of the back-end corpus (the example library and `tests/corpus/`), compiled
with random curves (and `--volumes` / `--soft-labels` as its inputs need):
* the graph passes `onnx.checker`'s full check (opset 17, IR 8, symbolic N, C, H, W) and, in
  ONNX Runtime, gives tch's loss (`losscc eval` in float64) to 1e-5 and tch's gradient to
  2e-5 of its largest entry (the Rust suite `tests/backends.rs` holds 1e-5, or 4x tch's own
  float32 error where that is larger), with the curves baked in and as an input;
* `losscc_torch.OnnxLoss` (no onnx2torch) gives the same loss and `.grad`;
* tract loads the loss, gradient and exact-count graphs with symbolic dimensions and gives
  ONNX Runtime's outputs on two shapes (counts exactly);
* `jax.grad` of `losscc_jax.onnx_loss` gives tch's gradient, also under `jax.jit`;
* both wrappers take what the graph takes: `--volumes` graphs, `--soft-labels` graphs with
  soft labels, and a sigmoid metric's multi-hot labels, with `losscc eval`'s loss and gradient.
The wrappers refuse wrong dtypes, shapes, devices and files with one sentence each, and both
training examples (PyTorch through the gradient graph, JAX with optax) raise held-out mIoU.
"""

import json
import subprocess
import sys
import tempfile
import unittest
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime
import torch
import tract
from onnx2torch import convert

from test_onnx_loss import ROOT, Case, corpus, losscc, metadata, random_curves

sys.path.insert(0, str(ROOT / "examples" / "python"))
from losscc_jax import onnx_loss  # noqa: E402
from losscc_torch import OnnxLoss  # noqa: E402


def close_gradient(test, got, expected, tolerance, what, floor=0.0):
    """`got` within `tolerance` of `expected`'s largest entry, or within `floor` where float32
    itself cannot do better (see `tch_reference`)."""
    scale = max(float(np.abs(expected).max()), 1e-9)
    gap = float(np.abs(got - expected).max())
    bound = max(tolerance * scale, floor)
    test.assertLessEqual(gap, bound, f"{what}: gradient off by {gap:.3e} (largest entry {scale:.3e})")


def tract_run(path, inputs):
    model = tract.onnx().load(str(path))
    facts = [str(model.input_fact(i)) for i in range(model.input_count())]
    runnable = model.into_model().into_runnable()
    return facts, [value.to_numpy() for value in runnable.run(inputs)]


class GradientGraphTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="losscc-grad-"))

    def compile_case(self, case, rng):
        """The case's graphs, all with the same random curves: the gradient graph (baked and
        with a curves input), the loss graph and the exact-count graph."""
        probe = self.tmp / f"{case.name}.probe.onnx"
        losscc("compile", case.path, "-o", probe, *case.compile_flags())
        pieces = [c["pieces"] for c in json.loads(metadata(onnx.load(str(probe)))["losscc.curves"])]
        curves = random_curves(pieces, rng)
        params = self.tmp / f"{case.name}.params.json"
        params.write_text(json.dumps({"control_points": curves}))
        paths = {kind: self.tmp / f"{case.name}.{kind}.onnx" for kind in ("grad", "dynamic", "loss", "exact")}
        flags = case.compile_flags()
        losscc("compile", case.path, "--grad", "-o", paths["grad"], "--params", params, *flags)
        losscc("compile", case.path, "--grad", "--curves-input", "-o", paths["dynamic"], *flags)
        losscc("compile", case.path, "-o", paths["loss"], "--params", params, *flags)
        losscc("compile", case.path, "--exact", "-o", paths["exact"], *flags)
        flat = np.concatenate([np.asarray(c, dtype=np.float32) for c in curves]) if curves else np.zeros(0, np.float32)
        return paths, params, flat

    def tch_reference(self, case, params, logits, labels):
        """`losscc eval`'s loss and gradient computed in float64 (tch), the yardstick the
        float32 runtimes are held to, and the floor of their gradients' bound: 4x tch's own
        float32 error (where a class's union is a few pixels, ratios are steep and float32
        cannot reach 2e-5; `tests/backends.rs` uses the same floor)."""
        results = []
        for kind in (np.float64, np.float32):
            np.save(self.tmp / "logits.npy", logits.astype(kind))
            np.save(self.tmp / "labels.npy", labels)
            grad_path = self.tmp / "grad.npy"
            out = json.loads(losscc("eval", case.path, "--logits", self.tmp / "logits.npy", "--labels",
                                    self.tmp / "labels.npy", "--params", params, "--grad", grad_path,
                                    *case.flags()))
            results.append((out["loss"], np.load(grad_path)))
        (loss, grad), (_, single) = results
        return loss, grad, 4.0 * float(np.abs(single - grad).max())

    def eval_reference(self, path, logits, labels, sets):
        """`losscc eval`'s loss and gradient (tch) on these inputs."""
        np.save(self.tmp / "eval_logits.npy", logits)
        np.save(self.tmp / "eval_labels.npy", labels)
        grad_path = self.tmp / "eval_grad.npy"
        out = json.loads(losscc("eval", path, "--logits", self.tmp / "eval_logits.npy", "--labels",
                                self.tmp / "eval_labels.npy", "--grad", grad_path, *sets))
        return out["loss"], np.load(grad_path)

    def agree_in_every_runtime(self, what, graphs, logits, labels, tch_loss, tch_grad, facts):
        """The gradient graph in ONNX Runtime and tract (with input `facts`), and the loss graph
        through onnx2torch without a warning, give tch's loss and gradient."""
        tolerance = 1e-5 * max(abs(tch_loss), 1.0)
        loss, grad = onnxruntime.InferenceSession(str(graphs["grad"])).run(None, {"logits": logits, "labels": labels})
        self.assertLess(abs(float(loss) - tch_loss), tolerance)
        close_gradient(self, grad, tch_grad, 2e-5, f"{what} in ONNX Runtime")

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = convert(onnx.load(str(graphs["loss"])))
            x = torch.from_numpy(logits.copy()).requires_grad_(True)
            torch_loss = module(x, torch.from_numpy(labels))
            torch_loss.backward()
        self.assertEqual([str(w.message) for w in caught], [])
        self.assertLess(abs(torch_loss.item() - tch_loss), tolerance)
        close_gradient(self, x.grad.numpy(), tch_grad, 2e-5, f"{what} through onnx2torch")

        got_facts, (tract_loss, tract_grad) = tract_run(graphs["grad"], [logits, labels])
        self.assertEqual(got_facts, facts)
        self.assertLess(abs(float(tract_loss) - tch_loss), tolerance)
        close_gradient(self, tract_grad, tch_grad, 2e-5, f"{what} in tract")

    def test_every_case_in_onnx_runtime_torch_and_tract(self):
        cases = corpus()
        self.assertGreaterEqual(len(cases), 20)
        for case in cases:
            with self.subTest(case=case.name):
                paths, params, flat = self.compile_case(case, np.random.default_rng(case.seed + 5))
                model = onnx.load(str(paths["grad"]))
                onnx.checker.check_model(model, full_check=True)
                self.assertEqual((model.opset_import[0].version, model.ir_version), (17, 8))
                self.assertEqual([o.name for o in model.graph.output], ["loss", "dloss_dlogits"])
                dims = [d.dim_param for d in model.graph.output[1].type.tensor_type.shape.dim]
                self.assertEqual(dims, ["N", "C", "D", "H", "W"] if case.volumes else ["N", "C", "H", "W"])

                logits, labels = case.inputs(case.shape)
                tch_loss, tch_grad, floor = self.tch_reference(case, params, logits, labels)
                tolerance = 1e-5 * max(abs(tch_loss), 1.0)
                session = onnxruntime.InferenceSession(str(paths["grad"]))
                loss, grad = session.run(None, {"logits": logits, "labels": labels})
                self.assertEqual((loss.shape, grad.shape, grad.dtype), ((), logits.shape, np.float32))
                self.assertLess(abs(float(loss) - tch_loss), tolerance)
                close_gradient(self, grad, tch_grad, 2e-5, f"{case.name} in ONNX Runtime", floor)

                dynamic = onnxruntime.InferenceSession(str(paths["dynamic"]))
                feeds = {"logits": logits, "labels": labels, "curves": flat}
                d_loss, d_grad = dynamic.run(None, feeds)
                self.assertLess(abs(float(d_loss) - tch_loss), tolerance)
                close_gradient(self, d_grad, tch_grad, 2e-5, f"{case.name} with curves as an input", floor)

                x = torch.from_numpy(logits.copy()).requires_grad_(True)
                value = OnnxLoss(paths["grad"])(x, torch.from_numpy(labels))
                value.backward()
                self.assertLess(abs(value.item() - tch_loss), tolerance)
                close_gradient(self, x.grad.numpy(), tch_grad, 2e-5, f"{case.name} through OnnxLoss", floor)

                # tract, on the case's shape and another one through the same loaded graphs.
                other = case.other_shape(case.shape[1])
                for shape in (case.shape, other):
                    x, y = case.inputs(shape)
                    for kind in ("loss", "grad", "exact"):
                        facts, ours = tract_run(paths[kind], [x, y])
                        # Symbolic classes, unless per-class weights fix their number.
                        dim = onnx.load(str(paths[kind])).graph.input[0].type.tensor_type.shape.dim[1]
                        classes = str(dim.dim_value) if dim.HasField("dim_value") else "C"
                        fixed = {"class_weights": "5", "per_image_terms": "4"}
                        self.assertEqual(classes, fixed.get(case.name, "C"), kind)
                        self.assertEqual(facts, case.facts(classes), kind)
                        theirs = onnxruntime.InferenceSession(str(paths[kind])).run(None, {"logits": x, "labels": y})
                        for index, (a, b) in enumerate(zip(ours, theirs)):
                            if kind == "exact" and np.all(b == np.round(b)):
                                np.testing.assert_array_equal(a, b, f"{case.name} {shape} {kind} output {index}")
                            else:
                                scale = max(float(np.abs(b).max()), 1e-6)
                                np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale,
                                                           err_msg=f"{case.name} {shape} {kind} output {index}")

    def test_volumes_in_onnx_runtime_onnx2torch_and_tract(self):
        """Graphs compiled with `--volumes` (logits [N,C,D,H,W], cubic windows) give tch's loss
        and gradient (`losscc eval` on the same volumes) in ONNX Runtime, through onnx2torch
        (without a warning) and in tract."""
        rng = np.random.default_rng(11)
        logits = rng.uniform(-3, 3, (2, 4, 5, 7, 6)).astype(np.float32)
        labels = rng.integers(0, 4, (2, 5, 7, 6)).astype(np.int64)
        labels[rng.uniform(size=labels.shape) < 0.1] = 255
        for name, sets in (("dice", []), ("biou", ["--set", "tol=1"]), ("boundary_iou", ["--set", "d=1"])):
            with self.subTest(metric=name):
                path = ROOT / "examples" / f"{name}.metric"
                tch_loss, tch_grad = self.eval_reference(path, logits, labels, sets)
                graphs = {kind: self.tmp / f"{name}.volumes.{kind}.onnx" for kind in ("loss", "grad")}
                losscc("compile", path, "--volumes", "-o", graphs["loss"], *sets)
                losscc("compile", path, "--volumes", "--grad", "-o", graphs["grad"], *sets)
                model = onnx.load(str(graphs["grad"]))
                onnx.checker.check_model(model, full_check=True)
                dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
                self.assertEqual(dims, ["N", "C", "D", "H", "W"])
                self.agree_in_every_runtime(f"{name} volumes", graphs, logits, labels, tch_loss, tch_grad,
                                            ["N,C,D,H,W,f32", "N,D,H,W,i64"])

    def test_soft_labels_in_onnx_runtime_onnx2torch_and_tract(self):
        """Graphs compiled with `--soft-labels` take float32 probabilities of the logits' shape:
        the loss and gradient equal `losscc eval` on the same soft labels (ONNX Runtime,
        onnx2torch, tract), and the exact-count graph counts their argmax as the class-index
        graph counts the argmax labels."""
        rng = np.random.default_rng(12)
        logits = rng.uniform(-3, 3, (2, 4, 9, 11)).astype(np.float32)
        hard = rng.integers(0, 4, (2, 9, 11))
        soft = np.moveaxis(np.eye(4, dtype=np.float32)[hard], -1, 1) * 0.8 + 0.05
        ignored = rng.uniform(size=hard.shape) < 0.1
        soft = soft * (~ignored)[:, None].astype(np.float32)
        argmax = np.where(ignored, 255, hard).astype(np.int64)
        for name, sets in (("miou_ce", []), ("biou", ["--set", "tol=1"])):
            with self.subTest(metric=name):
                path = ROOT / "examples" / f"{name}.metric"
                tch_loss, tch_grad = self.eval_reference(path, logits, soft, sets)
                graphs = {kind: self.tmp / f"{name}.soft.{kind}.onnx" for kind in ("loss", "grad", "exact")}
                losscc("compile", path, "--soft-labels", "-o", graphs["loss"], *sets)
                losscc("compile", path, "--soft-labels", "--grad", "-o", graphs["grad"], *sets)
                losscc("compile", path, "--soft-labels", "--exact", "-o", graphs["exact"], *sets)
                model = onnx.load(str(graphs["grad"]))
                onnx.checker.check_model(model, full_check=True)
                self.assertEqual(model.graph.input[1].type.tensor_type.elem_type, onnx.TensorProto.FLOAT)
                self.agree_in_every_runtime(f"{name} soft labels", graphs, logits, soft, tch_loss, tch_grad,
                                            ["N,C,H,W,f32", "N,C,H,W,f32"])
                feeds = {"logits": logits, "labels": soft}

                hard_exact = self.tmp / f"{name}.hard.exact.onnx"
                losscc("compile", path, "--exact", "-o", hard_exact, *sets)
                ours = onnxruntime.InferenceSession(str(graphs["exact"])).run(None, feeds)
                theirs = onnxruntime.InferenceSession(str(hard_exact)).run(None, {"logits": logits, "labels": argmax})
                self.assertEqual(len(ours), len(theirs))
                for a, b in zip(ours, theirs):
                    np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)

    def test_sigmoid_metrics_in_onnx_runtime_onnx2torch_and_tract(self):
        """Sigmoid metrics (`with sigmoid = true`): a binary model (one channel, labels 0/1)
        through the class-index graphs, and a multi-label model (multi-hot labels of the
        logits' shape, the ignore value in one channel ignoring the pixel) through
        `--soft-labels` graphs, give `losscc eval`'s loss and gradient in ONNX Runtime,
        onnx2torch and tract; `eval`'s exact value equals a float64 NumPy computation of the
        definition (threshold on the sigmoid, counts over valid pixels)."""
        rng = np.random.default_rng(21)
        binary_logits = rng.uniform(-3, 3, (2, 1, 9, 11)).astype(np.float32)
        binary = rng.integers(0, 2, (2, 9, 11)).astype(np.int64)
        binary[rng.uniform(size=binary.shape) < 0.1] = 255
        multi_logits = rng.uniform(-3, 3, (2, 3, 9, 11)).astype(np.float32)
        multi = (rng.uniform(size=(2, 3, 9, 11)) < 0.4).astype(np.float32)
        ignored = rng.uniform(size=(2, 9, 11)) < 0.1
        multi[:, 1][ignored] = 255
        cases = [
            ("binary_dice", [], binary_logits, binary, False),
            ("binary_iou", ["--set", "threshold=0.3"], binary_logits, binary, False),
            ("dice_bce", [], binary_logits, binary, False),
            ("multilabel_iou", [], multi_logits, multi, True),
            ("dice_bce", [], multi_logits, multi, True),
        ]
        for name, sets, logits, labels, soft in cases:
            with self.subTest(metric=name, multi_label=soft):
                path = ROOT / "examples" / f"{name}.metric"
                tch_loss, tch_grad = self.eval_reference(path, logits, labels, sets)
                flags = ["--soft-labels"] if soft else []
                tag = "multi" if soft else "binary"
                graphs = {kind: self.tmp / f"{name}.{tag}.{kind}.onnx" for kind in ("loss", "grad")}
                losscc("compile", path, *flags, "-o", graphs["loss"], *sets)
                losscc("compile", path, *flags, "--grad", "-o", graphs["grad"], *sets)
                model = onnx.load(str(graphs["grad"]))
                onnx.checker.check_model(model, full_check=True)
                self.assertEqual(json.loads(metadata(model)["losscc.predictions"])["kind"], "sigmoid")
                facts = ["N,C,H,W,f32", "N,C,H,W,f32"] if soft else ["N,C,H,W,f32", "N,H,W,i64"]
                self.agree_in_every_runtime(f"{name} {tag}", graphs, logits, labels, tch_loss, tch_grad, facts)

        # The exact values, against float64 NumPy.
        def exact(path, logits, labels, sets):
            np.save(self.tmp / "exact_logits.npy", logits)
            np.save(self.tmp / "exact_labels.npy", labels)
            out = json.loads(losscc("eval", path, "--logits", self.tmp / "exact_logits.npy", "--labels",
                                    self.tmp / "exact_labels.npy", *sets))
            return out["metric"]

        p = binary_logits[:, 0] > np.log(0.3 / 0.7)
        valid = binary != 255
        y = binary == 1
        iou = (p & y & valid).sum() / ((p | y) & valid).sum()
        got = exact(ROOT / "examples" / "binary_iou.metric", binary_logits, binary, ["--set", "threshold=0.3"])
        self.assertAlmostEqual(got, float(iou), places=12)
        p = multi_logits > 0
        valid = ~(multi == 255).any(axis=1, keepdims=True)
        y = (multi == 1) & valid
        per_channel = (p & y & valid).sum(axis=(0, 2, 3)) / ((p | y) & valid).sum(axis=(0, 2, 3))
        got = exact(ROOT / "examples" / "multilabel_iou.metric", multi_logits, multi, [])
        self.assertAlmostEqual(got, float(per_channel.mean()), places=12)
        # Integer multi-hot labels read as the same targets.
        got = exact(ROOT / "examples" / "multilabel_iou.metric", multi_logits, multi.astype(np.uint8), [])
        self.assertAlmostEqual(got, float(per_channel.mean()), places=12)

    def test_jax_grad_equals_tch(self):
        rng = np.random.default_rng(8)
        for name, sets in [("miou", []), ("biou", ["tol=1"]), ("bf1", ["tol=1"]), ("miou_biou", []), ("dice", [])]:
            with self.subTest(metric=name):
                case = Case(ROOT / "examples" / f"{name}.metric")
                case.sets = sets
                paths, params, flat = self.compile_case(case, rng)
                logits, labels = case.inputs((2, 4, 16, 18))
                tch_loss, tch_grad, floor = self.tch_reference(case, params, logits, labels)
                loss_fn = onnx_loss(paths["grad"])
                value, grad = jax.value_and_grad(loss_fn)(jnp.asarray(logits), jnp.asarray(labels))
                self.assertLess(abs(float(value) - tch_loss), 1e-5 * max(abs(tch_loss), 1.0))
                close_gradient(self, np.asarray(grad), tch_grad, 2e-5, f"{name} jax.grad", floor)
                jitted = jax.jit(jax.grad(lambda x: 2.0 * loss_fn(x, jnp.asarray(labels))))(jnp.asarray(logits))
                close_gradient(self, np.asarray(jitted), 2.0 * tch_grad, 2e-5, f"{name} jax.jit(jax.grad)",
                               2.0 * floor)
                dynamic = onnx_loss(paths["dynamic"], curves=flat)
                close_gradient(self, np.asarray(jax.grad(dynamic)(jnp.asarray(logits), jnp.asarray(labels))),
                               tch_grad, 2e-5, f"{name} jax.grad with curves as an input", floor)

    def wrappers_agree(self, what, graph, logits, labels, tch_loss, tch_grad, torch_labels=None):
        """`OnnxLoss` (torch) and `onnx_loss` (JAX, also under `jax.jit`) on `graph` give tch's
        loss and gradient; `torch_labels` are the labels as handed to torch, if not `labels`."""
        tolerance = 1e-5 * max(abs(tch_loss), 1.0)
        x = torch.from_numpy(logits.copy()).requires_grad_(True)
        y = torch.from_numpy(labels) if torch_labels is None else torch_labels
        value = OnnxLoss(graph)(x, y)
        value.backward()
        self.assertLess(abs(value.item() - tch_loss), tolerance, f"{what} through OnnxLoss")
        close_gradient(self, x.grad.numpy(), tch_grad, 2e-5, f"{what} through OnnxLoss")
        loss_fn = onnx_loss(graph)
        value, grad = jax.value_and_grad(loss_fn)(jnp.asarray(logits), jnp.asarray(labels))
        self.assertLess(abs(float(value) - tch_loss), tolerance, f"{what} through jax")
        close_gradient(self, np.asarray(grad), tch_grad, 2e-5, f"{what} jax.grad")
        jitted = jax.jit(jax.grad(lambda v: 2.0 * loss_fn(v, jnp.asarray(labels))))(jnp.asarray(logits))
        close_gradient(self, np.asarray(jitted), 2.0 * tch_grad, 2e-5, f"{what} jax.jit(jax.grad)")

    def test_wrappers_take_volume_graphs(self):
        """`--volumes` gradient graphs (logits [N,C,D,H,W], labels [N,D,H,W]) through both
        wrappers give `losscc eval --grad`'s loss and gradient on the same volumes."""
        rng = np.random.default_rng(31)
        logits = rng.uniform(-3, 3, (2, 3, 4, 5, 6)).astype(np.float32)
        labels = rng.integers(0, 3, (2, 4, 5, 6)).astype(np.int64)
        labels[rng.uniform(size=labels.shape) < 0.1] = 255
        for name in ("dice", "dice_per_image"):
            with self.subTest(metric=name):
                path = ROOT / "examples" / f"{name}.metric"
                graph = self.tmp / f"{name}.volumes.wrapped.grad.onnx"
                losscc("compile", path, "--volumes", "--grad", "-o", graph)
                tch_loss, tch_grad = self.eval_reference(path, logits, labels, [])
                self.wrappers_agree(f"{name} volumes", graph, logits, labels, tch_loss, tch_grad)

    def test_wrappers_take_soft_label_graphs(self):
        """`--soft-labels` gradient graphs with label-smoothed soft labels (float32 of the
        logits' shape, all 0 at ignored pixels) through both wrappers give `losscc eval`'s."""
        rng = np.random.default_rng(32)
        logits = rng.uniform(-3, 3, (2, 4, 7, 9)).astype(np.float32)
        hard = rng.integers(0, 4, (2, 7, 9))
        smoothing = 0.1
        soft = np.moveaxis(np.eye(4, dtype=np.float32)[hard], -1, 1) * (1 - smoothing) + smoothing / 4
        soft *= (rng.uniform(size=hard.shape) >= 0.1)[:, None].astype(np.float32)
        for name in ("miou", "miou_ce"):
            with self.subTest(metric=name):
                path = ROOT / "examples" / f"{name}.metric"
                graph = self.tmp / f"{name}.soft.wrapped.grad.onnx"
                losscc("compile", path, "--soft-labels", "--grad", "-o", graph)
                tch_loss, tch_grad = self.eval_reference(path, logits, soft, [])
                self.wrappers_agree(f"{name} soft labels", graph, logits, soft, tch_loss, tch_grad)

    def test_wrappers_take_multi_hot_sigmoid_graphs(self):
        """The multi-label sigmoid `multilabel_iou` with multi-hot labels of the logits' shape
        (the ignore value in one channel ignoring the pixel) through its `--soft-labels`
        gradient graph, given float32 (and, to torch, uint8) labels, and with class indices
        (one-hot targets) through its default graph, gives `losscc eval`'s loss and gradient
        in both wrappers; its `--exact` graph's counts give `eval`'s metric."""
        rng = np.random.default_rng(33)
        path = ROOT / "examples" / "multilabel_iou.metric"
        logits = rng.uniform(-3, 3, (2, 3, 7, 9)).astype(np.float32)
        multi = (rng.uniform(size=logits.shape) < 0.4).astype(np.float32)
        multi[:, 1][rng.uniform(size=(2, 7, 9)) < 0.1] = 255
        graph = self.tmp / "multilabel_iou.multi.wrapped.grad.onnx"
        losscc("compile", path, "--soft-labels", "--grad", "-o", graph)
        tch_loss, tch_grad = self.eval_reference(path, logits, multi, [])
        self.wrappers_agree("multilabel_iou multi-hot", graph, logits, multi, tch_loss, tch_grad)
        self.wrappers_agree("multilabel_iou multi-hot uint8", graph, logits, multi, tch_loss, tch_grad,
                            torch_labels=torch.from_numpy(multi.astype(np.uint8)))

        indices = rng.integers(0, 3, (2, 7, 9)).astype(np.int64)
        indices[rng.uniform(size=indices.shape) < 0.1] = 255
        graph = self.tmp / "multilabel_iou.indices.wrapped.grad.onnx"
        losscc("compile", path, "--grad", "-o", graph)
        tch_loss, tch_grad = self.eval_reference(path, logits, indices, [])
        self.wrappers_agree("multilabel_iou class indices", graph, logits, indices, tch_loss, tch_grad)

        exact = self.tmp / "multilabel_iou.multi.exact.onnx"
        losscc("compile", path, "--soft-labels", "--exact", "-o", exact)
        model = onnx.load(str(exact))
        onnx.checker.check_model(model, full_check=True)
        session = onnxruntime.InferenceSession(str(exact))
        outputs = dict(zip([o.name for o in session.get_outputs()],
                           session.run(None, {"logits": logits, "labels": multi})))
        inter, union = (outputs[a["output"]] for a in json.loads(metadata(model)["losscc.accumulators"]))
        np.save(self.tmp / "exact_logits.npy", logits)
        np.save(self.tmp / "exact_labels.npy", multi)
        reference = json.loads(losscc("eval", path, "--logits", self.tmp / "exact_logits.npy", "--labels",
                                      self.tmp / "exact_labels.npy"))
        present = union > 0
        self.assertTrue(present.all())
        self.assertAlmostEqual(float(np.mean(inter[present] / union[present])), reference["metric"], places=6)

    def test_wrappers_refuse_the_wrong_label_kind_with_one_sentence(self):
        """A volume or soft-label graph given what another graph takes is refused in one
        sentence naming what this graph expects."""
        volumes, soft = self.tmp / "dice.volumes.refuse.onnx", self.tmp / "miou.soft.refuse.onnx"
        plain = self.tmp / "miou.plain.refuse.onnx"
        losscc("compile", ROOT / "examples" / "dice.metric", "--volumes", "--grad", "-o", volumes)
        losscc("compile", ROOT / "examples" / "miou.metric", "--soft-labels", "--grad", "-o", soft)
        losscc("compile", ROOT / "examples" / "miou.metric", "--grad", "-o", plain)
        x, y = torch.zeros(2, 3, 4, 5), torch.zeros(2, 4, 5, dtype=torch.long)
        x3, y3 = torch.zeros(2, 3, 2, 4, 5), torch.zeros(2, 2, 4, 5, dtype=torch.long)
        self.one_sentence(ValueError, lambda: OnnxLoss(volumes)(x, y), "[N, C, D, H, W]", "--volumes")
        self.one_sentence(ValueError, lambda: OnnxLoss(volumes)(x3, y), "labels must be [N, D, H, W]")
        self.one_sentence(ValueError, lambda: OnnxLoss(soft)(x, y), "[N, C, H, W]", "--soft-labels")
        self.one_sentence(TypeError, lambda: OnnxLoss(plain)(x, x), "integer", "--soft-labels")
        self.one_sentence(ValueError, lambda: OnnxLoss(plain)(x, x.long()), "logits' shape", "--soft-labels")
        self.assertEqual(OnnxLoss(volumes)(x3, y3).shape, ())
        jx, jy = jnp.zeros((2, 3, 4, 5)), jnp.zeros((2, 4, 5), jnp.int32)
        self.one_sentence(ValueError, lambda: onnx_loss(volumes)(jx, jy), "[N, C, D, H, W]", "--volumes")
        self.one_sentence(ValueError, lambda: onnx_loss(soft)(jx, jy), "[N, C, H, W]", "--soft-labels")
        self.one_sentence(TypeError, lambda: onnx_loss(plain)(jx, jx), "integer", "--soft-labels")

    def one_sentence(self, error_type, call, *words):
        with self.assertRaises(error_type) as caught:
            call()
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        for word in words:
            self.assertIn(word, message)

    def test_wrappers_refuse_bad_input_with_one_sentence(self):
        grad_path, loss_path, dynamic = self.tmp / "m.grad.onnx", self.tmp / "m.onnx", self.tmp / "m.dyn.onnx"
        losscc("compile", ROOT / "examples" / "miou.metric", "--grad", "-o", grad_path)
        losscc("compile", ROOT / "examples" / "miou.metric", "-o", loss_path)
        losscc("compile", ROOT / "examples" / "miou.metric", "--grad", "--curves-input", "-o", dynamic)
        loss = OnnxLoss(grad_path)
        x, y = torch.zeros(2, 3, 4, 5), torch.zeros(2, 4, 5, dtype=torch.long)
        self.one_sentence(TypeError, lambda: loss(x.double(), y), "float32", "float64")
        self.one_sentence(TypeError, lambda: loss(x, y.float()), "labels", "integer")
        self.one_sentence(ValueError, lambda: loss(x[0], y), "[N, C, H, W]")
        self.one_sentence(ValueError, lambda: loss(x, y[:, :3]), "labels must be [N, H, W]")
        self.one_sentence(ValueError, lambda: loss(x.to("meta"), y.to("meta")), "meta", "CPU")
        self.one_sentence(ValueError, lambda: loss(x, y.to("meta")), "labels are on meta")
        self.one_sentence(ValueError, lambda: OnnxLoss(loss_path), "dloss_dlogits", "--grad")
        self.one_sentence(ValueError, lambda: OnnxLoss(dynamic), "--curves-input", "curves=")
        self.one_sentence(ValueError, lambda: OnnxLoss(dynamic, curves=[0.5] * 3), "takes 12 curve coordinates")
        self.one_sentence(ValueError, lambda: OnnxLoss(grad_path, curves=[0.5] * 12), "bakes its curves in")
        jax_loss = onnx_loss(grad_path)
        self.one_sentence(TypeError, lambda: jax_loss(jnp.zeros((2, 3, 4, 5), jnp.int32), jnp.zeros((2, 4, 5), jnp.int32)),
                          "float32")
        self.one_sentence(ValueError, lambda: jax_loss(jnp.zeros((2, 3, 4, 5)), jnp.zeros((2, 4, 4), jnp.int32)),
                          "labels must be [N, H, W]")
        self.one_sentence(ValueError, lambda: onnx_loss(loss_path), "dloss_dlogits")

    def test_cuda_execution_provider_without_host_copies(self):
        if not torch.cuda.is_available() or "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            self.skipTest("no CUDA GPU with onnxruntime-gpu here: the CUDA route of OnnxLoss runs only on one")
        path = self.tmp / "cuda.grad.onnx"
        losscc("compile", ROOT / "examples" / "biou.metric", "--grad", "--set", "tol=2", "-o", path)
        logits, labels = Case(ROOT / "examples" / "biou.metric").inputs((2, 4, 32, 32))
        loss = OnnxLoss(path)
        cpu = torch.from_numpy(logits).requires_grad_(True)
        loss(cpu, torch.from_numpy(labels)).backward()
        gpu = torch.from_numpy(logits).cuda().requires_grad_(True)
        value = loss(gpu, torch.from_numpy(labels).cuda())
        value.backward()
        self.assertEqual(gpu.grad.device.type, "cuda")
        close_gradient(self, gpu.grad.cpu().numpy(), cpu.grad.numpy(), 1e-5, "CUDA vs CPU")
        # Float labels (a `--soft-labels` graph) are bound as float32 on the GPU too.
        soft_path = self.tmp / "cuda.soft.grad.onnx"
        losscc("compile", ROOT / "examples" / "miou.metric", "--soft-labels", "--grad", "-o", soft_path)
        soft = torch.softmax(torch.from_numpy(logits[::-1].copy()), dim=1)
        soft_loss = OnnxLoss(soft_path)
        cpu = torch.from_numpy(logits).requires_grad_(True)
        soft_loss(cpu, soft).backward()
        gpu = torch.from_numpy(logits).cuda().requires_grad_(True)
        soft_loss(gpu, soft.cuda()).backward()
        close_gradient(self, gpu.grad.cpu().numpy(), cpu.grad.numpy(), 1e-5, "soft labels, CUDA vs CPU")


class TrainingWithTheGradientGraphTest(unittest.TestCase):
    def run_example(self, script, model, steps):
        result = subprocess.run([sys.executable, str(ROOT / "examples" / "python" / script), str(model),
                                 "--steps", str(steps)], capture_output=True, text=True, timeout=900)
        self.assertEqual(result.returncode, 0, result.stderr)
        return json.loads(result.stdout.strip().splitlines()[-1]), result.stdout

    def test_pytorch_and_jax_training_raise_miou(self):
        tmp = Path(tempfile.mkdtemp(prefix="losscc-gradtrain-"))
        model = tmp / "miou.grad.onnx"
        losscc("compile", ROOT / "examples" / "miou.metric", "--grad", "-o", model)
        summary, out = self.run_example("train_with_onnx_loss.py", model, 300)
        self.assertIn("OnnxLoss", summary["route"])
        self.assertGreater(summary["final_miou"], summary["start_miou"] + 0.3, out)
        summary, out = self.run_example("train_jax.py", model, 200)
        self.assertGreater(summary["final_miou"], summary["start_miou"] + 0.4, out)


if __name__ == "__main__":
    unittest.main()
