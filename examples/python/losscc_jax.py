"""A losscc loss in JAX: the gradient graph in ONNX Runtime as a `jax.custom_vjp` function.

    losscc compile examples/miou.metric --grad -o miou.grad.onnx

    from losscc_jax import onnx_loss
    loss_fn = onnx_loss("miou.grad.onnx")     # loss_fn(logits, labels) -> scalar
    value, grads = jax.value_and_grad(lambda p: loss_fn(model(p, images), labels))(params)

The graph computes the loss and its gradient together; the forward pass keeps the gradient
and the backward pass scales it, so `jax.grad` costs one graph run. It runs on the host
through `jax.pure_callback`, so it works inside `jax.jit`. Bad inputs get one sentence each.
A graph compiled with `--curves-input` takes `onnx_loss(path, curves=flat_control_points)`.
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

    def host(logits, labels):
        loss, grad = session.run(None, {"logits": np.asarray(logits, dtype=np.float32),
                                        "labels": np.asarray(labels, dtype=np.int64), **extra})
        return np.asarray(loss, dtype=np.float32), np.asarray(grad, dtype=np.float32)

    def check(logits, labels):
        if logits.dtype != jnp.float32:
            raise TypeError(f"logits must be float32, but they are {logits.dtype}; convert them with .astype(jnp.float32)")
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            raise TypeError(f"labels must be integer class indices, but they are {labels.dtype}")
        if logits.ndim != 4:
            raise ValueError(f"logits must be [N, C, H, W], but they have shape {logits.shape}")
        if labels.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(f"labels must be [N, H, W] = {(logits.shape[0], *logits.shape[2:])} for logits of "
                             f"shape {logits.shape}, but they have shape {labels.shape}")

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
        # Labels are integers: their cotangent is the empty float0.
        return cotangent * grad, np.zeros(labels.shape, dtype=jax.dtypes.float0)

    loss.defvjp(forward, backward)
    return loss
