"""A losscc loss in PyTorch without onnx2torch: the gradient graph in ONNX Runtime, as a
`torch.autograd.Function`.

    losscc compile examples/miou.metric --grad -o miou.grad.onnx

    from losscc_torch import OnnxLoss
    loss_fn = OnnxLoss("miou.grad.onnx")      # a torch.nn.Module
    loss = loss_fn(logits, labels)            # logits float32 [N,C,H,W], labels integer [N,H,W]
    loss.backward()                           # d loss / d logits from the graph's dloss_dlogits

The wrapper takes what the graph takes (read from its inputs): a `--volumes` graph logits
[N,C,D,H,W] and labels [N,D,H,W]; a graph with float labels (`--soft-labels`: soft labels, or
a sigmoid metric's multi-hot targets) labels of the logits' shape, float (or 0/1 integer
multi-hot, converted to float32); any other graph integer class indices without C.

A graph compiled with `--curves-input` takes its curves as an input: pass them as
`OnnxLoss(path, curves=flat_control_points)` (all curves' points, flat, in manifest order).

The graph computes the loss and its gradient in one run (the compiler derived the gradient),
so `forward` runs it once and `backward` only scales the stored gradient. Tensors are handed
to ONNX Runtime in place through I/O binding: on the CPU, and on a GPU with the CUDA execution
provider (`onnxruntime-gpu`), without a copy to the host. Bad inputs get one sentence each
(`ValueError`/`TypeError`).
"""

import json

import numpy as np
import onnxruntime
import torch

__all__ = ["OnnxLoss"]


class _Contract:
    """What a graph takes, read from its inputs: the logits' rank and the labels' kind."""

    def __init__(self, session, path):
        inputs = {i.name: i for i in session.get_inputs()}
        if "logits" not in inputs or "labels" not in inputs:
            raise ValueError(f"`{path}` has no inputs logits and labels; compile it with `losscc compile FILE --grad`")
        self.rank = len(inputs["logits"].shape)
        if self.rank not in (4, 5):
            raise ValueError(f"`{path}` takes logits of rank {self.rank}; this wrapper takes [N, C, H, W] or "
                             "[N, C, D, H, W] graphs")
        self.float_labels = inputs["labels"].type == "tensor(float)"
        spatial = "D, H, W" if self.rank == 5 else "H, W"
        self.logits = f"[N, C, {spatial}]"
        self.labels = self.logits if self.float_labels else f"[N, {spatial}]"
        self.graph = "a volume graph (--volumes)" if self.rank == 5 else "an image graph"


def _curves_input(session, path, curves):
    """The flat float32 curves a graph takes as its `curves` input, or None when it bakes them."""
    inputs = {i.name: i for i in session.get_inputs()}
    if "curves" not in inputs:
        if curves is not None:
            raise ValueError(f"`{path}` bakes its curves in; compile it with `--curves-input` to pass curves")
        return None
    if curves is None:
        raise ValueError(f"`{path}` takes its curves as an input (compiled with --curves-input); pass curves=...")
    flat = np.asarray(curves, dtype=np.float32).reshape(-1)
    manifest = json.loads(session.get_modelmeta().custom_metadata_map.get("losscc.curves", "[]"))
    expected = sum(2 * (2 * curve["pieces"] - 1) for curve in manifest)
    if flat.size != expected:
        raise ValueError(f"`{path}` takes {expected} curve coordinates, but {flat.size} were given")
    return flat


class _Session:
    """An ONNX Runtime session of a gradient graph, for one device type."""

    def __init__(self, path, device, curves):
        available = onnxruntime.get_available_providers()
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in available:
                raise ValueError(
                    f"the logits are on {device} but this ONNX Runtime has no CUDA execution provider "
                    f"(it has {', '.join(available)}); install onnxruntime-gpu, or move the logits to the CPU")
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        elif device.type == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            raise ValueError(f"the logits are on {device}; this loss runs on the CPU or on CUDA GPUs")
        self.session = onnxruntime.InferenceSession(str(path), providers=providers)
        outputs = [o.name for o in self.session.get_outputs()]
        if "dloss_dlogits" not in outputs:
            raise ValueError(f"`{path}` has no output dloss_dlogits; compile it with `losscc compile FILE --grad`")
        self.contract = _Contract(self.session, path)
        flat = _curves_input(self.session, path, curves)
        self.curves = None if flat is None else torch.from_numpy(flat).to(device)
        self.device = device

    def run(self, logits, labels):
        """The loss and its gradient, as tensors on the logits' device."""
        device_type = "cuda" if self.device.type == "cuda" else "cpu"
        device_id = self.device.index or 0
        loss = torch.empty((), dtype=torch.float32, device=logits.device)
        grad = torch.empty_like(logits)
        binding = self.session.io_binding()
        binding.bind_input("logits", device_type, device_id, np.float32, list(logits.shape), logits.data_ptr())
        label_type = np.float32 if self.contract.float_labels else np.int64
        binding.bind_input("labels", device_type, device_id, label_type, list(labels.shape), labels.data_ptr())
        if self.curves is not None:
            binding.bind_input("curves", device_type, device_id, np.float32, list(self.curves.shape),
                               self.curves.data_ptr())
        binding.bind_output("loss", device_type, device_id, np.float32, [], loss.data_ptr())
        binding.bind_output("dloss_dlogits", device_type, device_id, np.float32, list(logits.shape), grad.data_ptr())
        if device_type == "cuda":
            torch.cuda.synchronize(logits.device)
        self.session.run_with_iobinding(binding)
        return loss, grad


def _checked(logits, labels, contract):
    """The inputs as the graph takes them, or one sentence saying what is wrong."""
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("logits and labels must be torch tensors")
    if logits.dtype != torch.float32:
        raise TypeError(f"logits must be float32, but they are {logits.dtype}; convert them with .float()")
    if labels.dtype.is_complex:
        raise TypeError(f"labels must be real numbers, but they are {labels.dtype}")
    if logits.dim() != contract.rank:
        raise ValueError(f"logits must be {contract.logits} for {contract.graph}, but they have shape "
                         f"{tuple(logits.shape)}")
    indices = (logits.shape[0], *logits.shape[2:])
    if contract.float_labels:
        if labels.shape != logits.shape:
            raise ValueError(f"labels must be {contract.labels} = {tuple(logits.shape)} (float, the logits' shape) "
                             f"for this graph, which takes soft or multi-hot labels (compiled with --soft-labels), "
                             f"but they have shape {tuple(labels.shape)}")
    else:
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"labels must be integer class indices {contract.labels} for this graph, but they are "
                            f"{labels.dtype}; float labels of the logits' shape need a graph compiled with "
                            "--soft-labels")
        if labels.shape == logits.shape:
            raise ValueError(f"labels must be integer class indices {contract.labels} = {indices} for this graph, "
                             "but they have the logits' shape; multi-hot or soft labels of the logits' shape need a "
                             "graph compiled with --soft-labels")
        if labels.shape != indices:
            raise ValueError(f"labels must be {contract.labels} = {indices} for logits of shape "
                             f"{tuple(logits.shape)}, but they have shape {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"logits are on {logits.device} but labels are on {labels.device}; put both on one device")
    kind = torch.float32 if contract.float_labels else torch.int64
    return logits.detach().contiguous(), labels.detach().to(kind).contiguous()


class _Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, session):
        loss, grad = session.run(*_checked(logits, labels, session.contract))
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad_output * grad, None, None


class OnnxLoss(torch.nn.Module):
    """A losscc gradient graph (`losscc compile FILE --grad`) as a PyTorch loss module."""

    def __init__(self, path, curves=None):
        super().__init__()
        self.path = str(path)
        self.curves = curves
        self._sessions = {}
        # Load once on the CPU now, so that a wrong file or a missing `curves=` is said here.
        self._session(torch.device("cpu"))

    def _session(self, device):
        key = (device.type, device.index)
        if key not in self._sessions:
            self._sessions[key] = _Session(self.path, device, self.curves)
        return self._sessions[key]

    def forward(self, logits, labels):
        if not isinstance(logits, torch.Tensor):
            raise TypeError("logits and labels must be torch tensors")
        return _Function.apply(logits, labels, self._session(logits.device))
