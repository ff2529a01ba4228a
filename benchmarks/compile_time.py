"""Compile time of a 2-layer LSTM model, fastrnn against torch.nn, each in a fresh process with
an empty inductor cache: `python benchmarks/compile_time.py`.

The model is LSTM(32, 64, num_layers=2) and a Linear head; each call runs forward and backward.
Calls 1-3 use (T, B) = (20, 8), (30, 16), (25, 4): the first compiles, the second recompiles
with dynamic sizes, the third must reuse that graph. A trivial compiled function (one
elementwise op, forward and backward) gives inductor's own start-up cost in a fresh process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

SHAPES = [(20, 8), (30, 16), (25, 4)]

CHILD = r"""
import json, sys, time, warnings
import torch
from torch import nn
import fastrnn
warnings.filterwarnings("ignore")
kind, shapes = sys.argv[1], json.loads(sys.argv[2])
torch.manual_seed(0)
if kind == "trivial":
    model, fullgraph = (lambda x: (x.sin() + 1).sum()), True
    make_input = lambda steps, batch: torch.randn(steps, batch, 32, requires_grad=True)
else:
    lib = nn if kind == "torch.nn" else fastrnn
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = lib.LSTM(32, 64, num_layers=2)
            self.head = nn.Linear(64, 5)
        def forward(self, x):
            return self.head(self.rnn(x)[0]).sum()
    model, fullgraph = Model(), kind == "fastrnn"  # torch.nn's LSTM cannot compile fullgraph
    make_input = lambda steps, batch: torch.randn(steps, batch, 32)
compiled = torch.compile(model, fullgraph=fullgraph)
times = []
for steps, batch in shapes:
    x = make_input(steps, batch)
    start = time.perf_counter()
    compiled(x).backward()
    times.append(time.perf_counter() - start)
print(json.dumps({"seconds": times,
                  "frames": torch._dynamo.utils.counters["stats"]["unique_graphs"]}))
"""


def measure(kind: str) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        done = subprocess.run([sys.executable, "-c", CHILD, kind, json.dumps(SHAPES)], env=env,
                              capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    print("model      " + "".join(f"  call {i + 1} T{t} B{b}" for i, (t, b) in enumerate(SHAPES))
          + "  graphs")
    for kind in ("trivial", "torch.nn", "fastrnn"):
        result = measure(kind)
        print(f"{kind:<11}" + "".join(f"  {s:>13.2f}s" for s in result["seconds"])
              + f"  {result['frames']}")


if __name__ == "__main__":
    main()
