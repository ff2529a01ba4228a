"""What deploying users would run instead of fastrnn on a CPU: the model fastrnn exports to ONNX
(`torch.onnx.export(..., dynamo=True)`: ONNX's LSTM / GRU / RNN operator) in ONNX Runtime and in
OpenVINO, as benchmark implementations beside torch.nn and fastrnn's backends (forward only).

    onnxruntime        ONNX Runtime, CPUExecutionProvider, float32
    openvino           OpenVINO on the CPU with its precision hint: f32 for float32, bf16 for
                       bfloat16 (the float32 model, run in bfloat16 by OpenVINO)

Both are optional (`pip install -e ".[bench]"`); a missing one is skipped, saying so. Each uses
as many threads as torch does.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile

import numpy as np
import torch
from torch.nn.utils.rnn import PackedSequence

import fastrnn

RUNTIMES = ("onnxruntime", "openvino")
_MODULES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}


def why_not(runtime: str, config, dtype: str, pass_name: str, device: torch.device) -> str:
    """Why `runtime` does not time this case, or ""."""
    if importlib.util.find_spec(_MODULES[runtime]) is None:
        return f"{runtime} is not installed (pip install -e \".[bench]\")"
    if device.type != "cpu":
        return "it runs on the CPU"
    if pass_name != "fwd":
        return "it runs inference only"
    if config.stepwise or config.is_cell:
        return "it runs whole sequences"
    if config.packed:
        return "the benchmark feeds it padded input only"
    if dtype not in ("fp32", "bf16") or (runtime == "onnxruntime" and dtype != "fp32"):
        return f"{runtime} runs this model in {'float32' if runtime == 'onnxruntime' else 'f32 or bf16'}"
    if dtype == "bf16" and os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper().startswith("AVX2"):
        return "OpenVINO compiles no bfloat16 recurrence with oneDNN held to AVX2 (--isa=avx2)"
    return ""


class ExportedWorkload:
    """One config's float32 module exported to ONNX and compiled by a runtime; `forward` returns
    (output, state) as torch tensors, like rnn_cases.Workload."""

    def __init__(self, problem, runtime: str, dtype: str):
        twin = getattr(fastrnn, type(problem.module).__name__)
        model = twin.from_torch(problem.module).eval()  # a float32 copy
        self.is_lstm = isinstance(problem.module, torch.nn.LSTM)
        x = problem.input.data if isinstance(problem.input, PackedSequence) else problem.input
        self.device = torch.device("cpu")
        self.input = x.float().numpy()
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "model.onnx")
            exported = torch.onnx.export(model, (x.float(),), dynamo=True, verbose=False)
            exported.save(path)
            self._run = _compile(runtime, path, dtype)

    def forward(self):
        outputs = self._run(self.input)
        tensors = [torch.from_numpy(np.asarray(value)) for value in outputs]
        return tensors[0], tuple(tensors[1:3]) if self.is_lstm else tensors[1]

    def runner(self, pass_name: str):
        return lambda: self._run(self.input)


def _compile(runtime: str, path: str, dtype: str):
    """A callable running the model at `path` on one input array, returning its outputs."""
    threads = torch.get_num_threads()
    if runtime == "onnxruntime":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(path, options,
                                               providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})
    import openvino

    core = openvino.Core()
    compiled = core.compile_model(path, "CPU", {
        "INFERENCE_PRECISION_HINT": "bf16" if dtype == "bf16" else "f32",
        "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()

    def run(x):
        request.infer({0: x})
        return [request.get_output_tensor(i).data.copy() for i in range(len(compiled.outputs))]

    return run
