"""A device-resident step (``--device cuda``): parameters, gradient accumulators, optimizer state
and the saved tensors of a micro-batch stay in the execution provider's memory across
micro-batches and steps; only the loss, the model output for accuracy, and (at checkpoints) the
weights come back to the host. The optimizer runs as a small ONNX graph on the same provider
(``export/optim_graphs.py``), one run per parameter, outputs bound to the inputs' buffers.

The same code runs on the CPU provider (``SessionConfig(resident=True)``), which is how the CPU-only
tests check it against the host path; on a GPU ``benchmarks/gpu_check.sh`` checks it (session 22,
an H200: the CPU's losses to 2.4e-7-8.5e-4 over 20 steps, resume and eval; see the README).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from contract import UserError, names

from .sessions import check_provider_started, cuda_options, load_graph, run_options

__all__ = ["Resident"]


class Resident:
    """Device copies of a trainer's parameters, gradients and optimizer state."""

    def __init__(self, trainer, device: str) -> None:
        self.trainer = trainer
        self.device = device  # onnxruntime device name: "cuda" or "cpu"
        self.params = {k: self._put(v) for k, v in trainer.params.items()}
        self.grads = {k: self._put(np.zeros_like(v)) for k, v in trainer.params.items()}
        self._zeros = {k: np.zeros_like(v) for k, v in trainer.params.items()}
        opt = trainer.config.optim.name
        self.state = {k: {name: self._put(a) for name, a in st.items()}
                      for k, st in trainer.optimizer.state.items()}
        graph = trainer.bundle.manifest.optimizers.get(opt)
        if graph is None:
            raise UserError(f"bundle {trainer.bundle.path} has no '{opt}' optimizer graph (needed "
                            "for --device cuda); re-export it with this version")
        so = ort.SessionOptions()
        so.log_severity_level = 4
        providers = [("CUDAExecutionProvider", cuda_options()) if p == "CUDAExecutionProvider"
                     else p for p in trainer._providers()]  # (as the step's sessions)
        self.optim = load_graph(trainer.bundle, graph, so, providers)  # (untrusted as they are)
        if device == "cuda":
            check_provider_started(self.optim)

    def _put(self, a: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), self.device, 0)

    def zero_grads(self) -> None:
        for k, ov in self.grads.items():
            ov.update_inplace(self._zeros[k])

    def micro_step(self, mode: str, x: dict, y: np.ndarray, weight: float) -> tuple[float, int]:
        tr = self.trainer
        io = tr.bundle.io(mode)
        fwd, bwd = tr.session(mode, "forward"), tr.session(mode, "backward")
        carried = tr.prefix_feeds(x, y)
        b = fwd.io_binding()
        for name, value in tr._feeds(io.forward_inputs, x, y,
                                     {**self.params, **carried}).items():
            b.bind_ortvalue_input(name, value)
        host = {names.LOSS, tr.bundle.output, *io.fwd_grams.values()}
        for name in io.forward_outputs:
            b.bind_output(name, "cpu" if name in host else self.device)
        fwd.run_with_iobinding(b, run_options())
        outs = dict(zip(io.forward_outputs, b.get_outputs(), strict=True))
        del b
        outs.update(carried)
        del carried
        tr.shared.release()
        fgrams = {layer: outs.pop(name).numpy() for layer, name in io.fwd_grams.items()}
        loss = float(outs[names.LOSS].numpy())
        correct = (0, len(y))
        if tr.bundle.classification and tr.bundle.output in outs:
            from .trainer import score

            correct = score(outs[tr.bundle.output].numpy(), y, tr.bundle.manifest.loss)
        outs[io.loss_scale] = ort.OrtValue.ortvalue_from_numpy(np.array(weight, np.float32))
        outs.update((io.grad_acc[p], self.grads[p]) for p in tr.params)
        bb = bwd.io_binding()
        for name, value in tr._feeds(io.backward_inputs, x, y, {**self.params, **outs}).items():
            bb.bind_ortvalue_input(name, value)
        del outs
        for p in tr.params:
            bb.bind_ortvalue_output(io.grads[p], self.grads[p])
        for name in io.bwd_grams.values():  # calibration's small Grams come to the host
            bb.bind_output(name, "cpu")
        bwd.run_with_iobinding(bb, run_options())
        if io.bwd_grams:
            got = bb.get_outputs()[len(tr.params):]
            tr.add_grams(weight, y, fgrams,
                         {layer: v.numpy() for layer, v in zip(io.bwd_grams, got, strict=True)})
        return loss, correct

    def optimizer_step(self) -> None:
        tr = self.trainer
        opt = tr.optimizer
        opt.t += 1
        cfg = tr.config.optim
        f = np.float32
        if cfg.name == "adamw":
            scalars = {"lr": f(opt.lr), "b1": f(opt.b1), "b2": f(opt.b2), "eps": f(opt.eps),
                       "wd": f(opt.wd), "c1": f(1.0 - opt.b1 ** opt.t), "c2": f(1.0 - opt.b2 ** opt.t)}
            inout = {"p": ("p_out", None), "m": ("m_out", "m"), "v": ("v_out", "v")}
        else:
            scalars = {"lr": f(opt.lr), "mu": f(opt.momentum), "wd": f(opt.wd)}
            inout = {"p": ("p_out", None), "v": ("v_out", "v")}
        for k in tr.params:
            b = self.optim.io_binding()
            bufs = {"p": self.params[k], **self.state[k]}
            b.bind_ortvalue_input("g", self.grads[k])
            for name, (out, _) in inout.items():
                b.bind_ortvalue_input(name, bufs[name])
                b.bind_ortvalue_output(out, bufs[name])
            for name, v in scalars.items():
                b.bind_cpu_input(name, np.asarray(v, np.float32))
            self.optim.run_with_iobinding(b)

    def to_host(self) -> None:
        """Copy parameters and optimizer state back into the trainer's numpy arrays."""
        tr = self.trainer
        for k, ov in self.params.items():
            np.copyto(tr.params[k], ov.numpy())
        for k, st in self.state.items():
            for name, ov in st.items():
                np.copyto(tr.optimizer.state[k][name], ov.numpy())

    def from_host(self) -> None:
        tr = self.trainer
        for k, ov in self.params.items():
            ov.update_inplace(np.ascontiguousarray(tr.params[k]))
        for k, st in self.state.items():
            for name, ov in st.items():
                ov.update_inplace(np.ascontiguousarray(tr.optimizer.state[k][name]))
