"""A losscc loss in JAX: the gradient graph in ONNX Runtime as a `jax.custom_vjp` function.

    losscc compile examples/miou.metric --grad -o miou.grad.onnx

    from losscc_jax import onnx_loss
    loss_fn = onnx_loss("miou.grad.onnx")     # loss_fn(logits, labels) -> scalar
    value, grads = jax.value_and_grad(lambda p: loss_fn(model(p, images), labels))(params)

The graph computes the loss and its gradient together; the forward pass keeps the gradient
and the backward pass scales it, so `jax.grad` costs one graph run. It runs on the host
through `jax.pure_callback`, so it works inside `jax.jit`. Bad inputs get one sentence each.
A graph compiled with `--curves-input` takes `onnx_loss(path, curves=flat_control_points)`.

The function takes what the graph takes (read from its inputs): a `--volumes` graph logits
[N,C,D,H,W] and labels [N,D,H,W]; a graph with float labels (`--soft-labels`: soft labels, or
a sigmoid metric's multi-hot targets) labels of the logits' shape, float (or 0/1 integer
multi-hot, converted to float32); any other graph integer class indices without C.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime

__all__ = ["onnx_loss"]


def onnx_loss(path, curves=None):
    """The loss of a losscc gradient graph as a differentiable JAX function of the logits."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if "dloss_dlogits" not in [o.name for o in session.get_outputs()]:
        raise ValueError(f"`{path}` has no output dloss_dlogits; compile it with `losscc compile FILE --grad`")
    extra = {}
    if "curves" in [i.name for i in session.get_inputs()]:
        if curves is None:
            raise ValueError(f"`{path}` takes its curves as an input (compiled with --curves-input); pass curves=...")
        extra["curves"] = np.asarray(curves, dtype=np.float32).reshape(-1)
        manifest = json.loads(session.get_modelmeta().custom_metadata_map.get("losscc.curves", "[]"))
        expected = sum(2 * (2 * curve["pieces"] - 1) for curve in manifest)
        if extra["curves"].size != expected:
            raise ValueError(f"`{path}` takes {expected} curve coordinates, but {extra['curves'].size} were given")
    elif curves is not None:
        raise ValueError(f"`{path}` bakes its curves in; compile it with `--curves-input` to pass curves")
    inputs = {i.name: i for i in session.get_inputs()}
    rank = len(inputs["logits"].shape)
    float_labels = inputs["labels"].type == "tensor(float)"
    spatial = "D, H, W" if rank == 5 else "H, W"
    logits_dims = f"[N, C, {spatial}]"
    labels_dims = logits_dims if float_labels else f"[N, {spatial}]"
    graph = "a volume graph (--volumes)" if rank == 5 else "an image graph"
    label_type = np.float32 if float_labels else np.int64

    def host(logits, labels):
        loss, grad = session.run(None, {"logits": np.asarray(logits, dtype=np.float32),
                                        "labels": np.asarray(labels, dtype=label_type), **extra})
        return np.asarray(loss, dtype=np.float32), np.asarray(grad, dtype=np.float32)

    def check(logits, labels):
        if logits.dtype != jnp.float32:
            raise TypeError(f"logits must be float32, but they are {logits.dtype}; convert them with .astype(jnp.float32)")
        if jnp.issubdtype(labels.dtype, jnp.complexfloating):
            raise TypeError(f"labels must be real numbers, but they are {labels.dtype}")
        if logits.ndim != rank:
            raise ValueError(f"logits must be {logits_dims} for {graph}, but they have shape {logits.shape}")
        indices = (logits.shape[0], *logits.shape[2:])
        if float_labels:
            if labels.shape != logits.shape:
                raise ValueError(f"labels must be {labels_dims} = {logits.shape} (float, the logits' shape) for this "
                                 f"graph, which takes soft or multi-hot labels (compiled with --soft-labels), but "
                                 f"they have shape {labels.shape}")
        else:
            if not jnp.issubdtype(labels.dtype, jnp.integer):
                raise TypeError(f"labels must be integer class indices {labels_dims} for this graph, but they are "
                                f"{labels.dtype}; float labels of the logits' shape need a graph compiled with "
                                "--soft-labels")
            if labels.shape == logits.shape:
                raise ValueError(f"labels must be integer class indices {labels_dims} = {indices} for this graph, "
                                 "but they have the logits' shape; multi-hot or soft labels of the logits' shape "
                                 "need a graph compiled with --soft-labels")
            if labels.shape != indices:
                raise ValueError(f"labels must be {labels_dims} = {indices} for logits of shape {logits.shape}, "
                                 f"but they have shape {labels.shape}")

    def run(logits, labels):
        check(logits, labels)
        shapes = (jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct(logits.shape, jnp.float32))
        return jax.pure_callback(host, shapes, logits, labels)

    @jax.custom_vjp
    def loss(logits, labels):
        return run(logits, labels)[0]

    def forward(logits, labels):
        value, grad = run(logits, labels)
        return value, (grad, labels)

    def backward(residual, cotangent):
        grad, labels = residual
        # The labels get no gradient: zeros of their type, the empty float0 for integers.
        if jnp.issubdtype(labels.dtype, jnp.inexact):
            return cotangent * grad, jnp.zeros_like(labels)
        return cotangent * grad, np.zeros(labels.shape, dtype=jax.dtypes.float0)

    loss.defvjp(forward, backward)
    return loss
