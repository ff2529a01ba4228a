"""The benchmarked layer shapes, shared by `pytest benchmarks/`, `python -m fastrnn` and
`python -m fastrnn.gpu_report`.

Legend: B batch, T time steps, I input size, H hidden size.
"""

from __future__ import annotations

import dataclasses

import torch

from .backends.base import LayerConfig
from .cells import CELLS_BY_MODE

PASSES = ("fwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmarked layer shape."""

    suite: str  # where the shape comes from: "fastrnns", "deepbench-train", ...
    mode: str  # "LSTM", "GRU" or "RNN" (tanh), or a cell: "LSTMCell", "GRUCell", "RNNCell"
    batch: int
    seq: int
    hidden: int
    input: int = 0  # 0: same as hidden
    layers: int = 1
    bidirectional: bool = False
    packed: bool = False  # lengths uniform in [T/3, T]
    passes: tuple[str, ...] = PASSES
    dtypes: tuple[str, ...] = ("fp32",)
    small: bool = False  # cheap enough to time the reference backend by default
    # the T steps run as T calls of one step each, the state carried from call to call (a
    # decoder's cell in a Python loop, an RL policy's layer called once per environment step);
    # fwd+bwd: one backward at the end, through all of them. Cells always run so.
    stepwise: bool = False
    # also timed on ONNX Runtime and OpenVINO (benchmarks/onnx_runtimes.py), where installed
    runtimes: bool = False

    def __post_init__(self):
        if self.is_cell:
            object.__setattr__(self, "stepwise", True)

    @property
    def is_cell(self) -> bool:
        return self.mode.endswith("Cell")

    @property
    def layer_mode(self) -> str:
        """The mode of the layer the config runs: "LSTM", "GRU" or "RNN"."""
        return self.mode.removesuffix("Cell")

    @property
    def input_size(self) -> int:
        return self.input or self.hidden

    @property
    def label(self) -> str:
        parts = [self.suite, self.mode.lower()]
        if self.layers > 1:
            parts.append(f"{self.layers}L")
        if self.bidirectional:
            parts.append("bi")
        if self.packed:
            parts.append("packed")
        steps = f"T1x{self.seq}" if self.stepwise else f"T{self.seq}"  # T1x50: 50 calls of 1
        parts.append(f"B{self.batch}-{steps}-I{self.input_size}-H{self.hidden}")
        return "-".join(parts)


def gpu_configs() -> list[Config]:
    half = ("fp32", "bf16", "fp16")
    configs = [Config("fastrnns", "LSTM", 64, 100, 512, dtypes=half)]
    configs += [Config("deepbench-train", "LSTM", batch, 25, hidden, dtypes=half)
                for hidden in (512, 1024, 2048) for batch in (16, 64)]
    configs += [Config("deepbench-infer", "LSTM", batch, 25, 512, passes=("fwd",), dtypes=half,
                       small=True) for batch in (1, 4)]
    configs += [
        Config("long", "LSTM", 16, 1024, 768, dtypes=half),
        Config("packed", "LSTM", 64, 100, 512, packed=True, dtypes=half),
        Config("bidir", "LSTM", 64, 100, 512, layers=2, bidirectional=True, dtypes=half),
        Config("gru", "GRU", 64, 100, 512, dtypes=half),
        Config("rnn", "RNN", 64, 100, 512, dtypes=half),
        Config("latency", "LSTM", 1, 100, 256, dtypes=half, small=True),
    ]
    return configs + step_configs()


def step_configs(quick: bool = False) -> list[Config]:
    """Step-by-step calls: cells in a loop of T steps, and layers called with T = 1 per call."""
    configs = [Config("cell", "LSTMCell", 1, 50, 32),  # the fixed cost of a call
               Config("cell", "LSTMCell", 1, 50, 256),
               Config("step", "GRU", 1, 50, 256, stepwise=True),
               Config("step", "LSTM", 32, 50, 256, stepwise=True)]
    if quick:
        return configs[:1] + configs[2:3]
    configs += [Config("cell", "GRUCell", 1, 50, 384, input=64),
                Config("cell", "GRUCell", 64, 50, 128),
                Config("cell", "RNNCell", 16, 50, 256),
                Config("cell", "LSTMCell", 32, 10, 512, input=256),
                Config("step", "LSTM", 1, 50, 256, stepwise=True),
                Config("step", "LSTM", 1, 10, 512, layers=2, stepwise=True)]
    return configs


def cpu_inference_configs(quick: bool = False) -> list[Config]:
    """Small-batch inference, as served one request at a time: B 1 and 4, one call of T 1 or 100
    steps, H 128-512 (I = H), LSTM and GRU, float32, bfloat16 and int8 (dynamically quantized:
    fastrnn.quantized against torch's quantized modules), against ONNX Runtime and OpenVINO too;
    and the shapes of ANCHORS.md's table of deployment runtimes."""
    def config(mode, batch, seq, hidden, input=0):
        return Config("cpu-infer", mode, batch, seq, hidden, input=input, passes=("fwd",),
                      dtypes=("fp32", "bf16", "int8"), runtimes=True)

    if quick:
        return [config("LSTM", 1, 100, 256), config("GRU", 1, 100, 256),
                config("LSTM", 4, 1, 256)]
    configs = [config(mode, batch, seq, hidden) for mode in ("LSTM", "GRU") for batch in (1, 4)
               for seq in (1, 100) for hidden in (128, 256, 512)]
    return configs + [config("LSTM", 1, 100, 128, input=64), config("LSTM", 8, 200, 64, input=128),
                      config("LSTM", 16, 50, 256), config("LSTM", 64, 100, 512),
                      config("GRU", 64, 100, 512)]


def cpu_configs(quick: bool) -> list[Config]:
    small = [Config("cpu-small", mode, 16, 50, 256, small=True) for mode in ("LSTM", "GRU", "RNN")]
    small += [Config("cpu-small", "LSTM", 16, 50, 256, dtypes=("bf16", "fp16"), small=True),
              Config("cpu-small", "LSTM", 16, 50, 256, packed=True, small=True),
              # a small model in a training loop: one short call per batch
              Config("cpu-tiny", "LSTM", 32, 12, 64, small=True)]
    small += step_configs(quick=quick)
    small += cpu_inference_configs(quick=quick)
    if quick:
        return small + [Config("fastrnns", "LSTM", 64, 100, 512, passes=("fwd",))]
    return small + [Config("fastrnns", mode, 64, 100, 512) for mode in ("LSTM", "GRU", "RNN")]


# The persistent launches benchmarks/persistent_smoke.py checks on a GPU: (mode, B, T, H,
# bidirectional, dtype). Stress shapes are timed; tiny ones run under compute-sanitizer.
SMOKE_SHAPES = [
    ("LSTM", 16, 256, 768, False, "fp32"), ("LSTM", 16, 256, 768, False, "bf16"),
    ("LSTM", 16, 256, 1024, True, "bf16"), ("GRU", 64, 100, 512, True, "fp32"),
    ("RNN", 64, 100, 512, False, "fp16"),
]
SMOKE_TINY_SHAPES = [
    ("LSTM", 3, 7, 20, True, "fp32"), ("GRU", 5, 6, 33, False, "bf16"),
    ("RNN", 2, 5, 9, True, "fp16"), ("LSTM", 9, 4, 130, False, "bf16"),
]


def smoke_configs() -> list[Config]:
    """The smoke shapes as configs (forward and backward, each in its own dtype)."""
    return [Config("smoke", mode, batch, seq, hidden, bidirectional=bidirectional,
                   dtypes=(dtype,)) for mode, batch, seq, hidden, bidirectional, dtype
            in SMOKE_SHAPES + SMOKE_TINY_SHAPES]


def layer_config(config: Config, dtype: str, device_type: str) -> LayerConfig:
    """What a backend sees of the first layer of `config`."""
    mode = config.layer_mode
    return LayerConfig(cell=CELLS_BY_MODE["RNN_TANH" if mode == "RNN" else mode],
                       device_type=device_type, dtype=DTYPES[dtype], batch_size=config.batch,
                       seq_len=1 if config.stepwise else config.seq,
                       hidden_size=config.hidden, proj_size=0,
                       num_directions=2 if config.bidirectional else 1,
                       variable_lengths=config.packed)
