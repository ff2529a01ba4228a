"""Sequence classifiers on scikit-learn's handwritten digits, trained with torch.nn and with fastrnn.

Each 8x8 image (1797 of them, shipped inside scikit-learn, no download) is read as a sequence:
"rows" reads it row by row (8 steps of 8 features), "pixels" pixel by pixel (64 steps of 1).
Models:
  lstm    LSTM, last hidden state -> linear classifier
  bilstm  2-layer bidirectional LSTM fed a PackedSequence: every image is cropped to a random
          length (its first L steps, L uniform in [T/2, T], drawn once per image from the seed), so
          the batch holds sequences of different lengths; the final states of both directions of
          the top layer -> linear classifier
  gru     GRU, last hidden state -> linear classifier
Each model is trained twice from the same seed, once with torch.nn and once with fastrnn: the
modules register and initialise their parameters identically, so the two start from the same
weights (checked), see the same batches, and their loss curves should agree to float32 noise.

    python -m fastrnn.examples.digits [--models lstm bilstm gru] [--readings rows pixels]
                                      [--epochs N] [--backend reference]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn

MODELS = ("lstm", "bilstm", "gru")
READINGS = ("rows", "pixels")
DEFAULT_EPOCHS = {"rows": 10, "pixels": 20}
IMPLEMENTATIONS = ("torch.nn", "fastrnn")


@dataclasses.dataclass
class Dataset:
    """Sequences [N, T, F] in [0, 1], labels [N], and the length L kept of each sequence [N]."""

    x: torch.Tensor
    y: torch.Tensor
    lengths: torch.Tensor


def load(reading: str, seed: int = 0, test_fraction: float = 0.2) -> tuple[Dataset, Dataset]:
    """The digits as (train, test) sequences, split at random (fixed by `seed`)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # [N, 8, 8]
    x = images if reading == "rows" else images.reshape(len(images), 64, 1)
    y = torch.tensor(digits.target, dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    steps = x.shape[1]
    lengths = torch.randint(steps // 2, steps + 1, (len(x),), generator=generator)
    order = torch.randperm(len(x), generator=generator)
    test_count = int(len(x) * test_fraction)
    test, train = order[:test_count], order[test_count:]
    return (Dataset(x[train], y[train], lengths[train]),
            Dataset(x[test], y[test], lengths[test]))


class Classifier(nn.Module):
    """A recurrent encoder (torch.nn or fastrnn) and a linear layer on its final hidden state."""

    def __init__(self, model: str, implementation: str, features: int, hidden: int,
                 backend: str | None = None):
        super().__init__()
        library = nn if implementation == "torch.nn" else fastrnn
        extra = {} if implementation == "torch.nn" else {"backend": backend}
        self.packed = model == "bilstm"
        if model == "lstm":
            self.rnn = library.LSTM(features, hidden, batch_first=True, **extra)
        elif model == "bilstm":
            self.rnn = library.LSTM(features, hidden, num_layers=2, bidirectional=True,
                                    batch_first=True, **extra)
        else:
            self.rnn = library.GRU(features, hidden, batch_first=True, **extra)
        directions = 2 if self.packed else 1
        self.head = nn.Linear(directions * hidden, 10)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """x [B, T, F], lengths [B] -> logits [B, 10]."""
        if self.packed:
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            _, (h_n, _) = self.rnn(packed)
            final = torch.cat([h_n[-2], h_n[-1]], dim=1)  # top layer, forward and backward
        else:
            _, state = self.rnn(x)
            final = (state[0] if isinstance(state, tuple) else state)[-1]
        return self.head(final)


@dataclasses.dataclass
class RunResult:
    step_losses: list[float]
    epoch_losses: list[float]
    test_accuracy: float
    seconds: float
    int8_test_accuracy: float | None = None  # fastrnn's: the trained model made int8


def build(model: str, implementation: str, features: int, hidden: int, seed: int,
          backend: str | None = None) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(model, implementation, features, hidden, backend)


def check_same_initial_weights(model: str, features: int, hidden: int, seed: int) -> None:
    """Raise unless torch.nn and fastrnn classifiers built from `seed` have identical weights."""
    reference = build(model, "torch.nn", features, hidden, seed).state_dict()
    candidate = build(model, "fastrnn", features, hidden, seed).state_dict()
    if list(reference) != list(candidate):
        raise AssertionError(f"parameter names differ: {list(reference)} != {list(candidate)}")
    for name, value in reference.items():
        if not torch.equal(value, candidate[name]):
            raise AssertionError(f"{name}: same seed, different initial weights")


def accuracy(classifier: Classifier, data: Dataset, batch_size: int = 512) -> float:
    classifier.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data.y), batch_size):
            batch = slice(start, start + batch_size)
            logits = classifier(data.x[batch], data.lengths[batch])
            correct += (logits.argmax(1) == data.y[batch]).sum().item()
    return correct / len(data.y)


def train(model: str, reading: str, implementation: str, *, epochs: int = 10, hidden: int = 64,
          batch_size: int = 64, lr: float = 1e-2, seed: int = 0, train_size: int | None = None,
          backend: str | None = None, log=print) -> RunResult:
    """Train one classifier with Adam on cross-entropy (gradient norm clipped to 1); log a line
    per epoch."""
    train_data, test_data = load(reading, seed)
    if train_size is not None:
        train_data = Dataset(train_data.x[:train_size], train_data.y[:train_size],
                             train_data.lengths[:train_size])
    classifier = build(model, implementation, train_data.x.shape[2], hidden, seed, backend)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
    shuffle = torch.Generator().manual_seed(seed)
    step_losses, epoch_losses = [], []
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        classifier.train()
        order = torch.randperm(len(train_data.y), generator=shuffle)
        losses = []
        for first in range(0, len(order), batch_size):
            batch = order[first:first + batch_size]
            logits = classifier(train_data.x[batch], train_data.lengths[batch])
            loss = nn.functional.cross_entropy(logits, train_data.y[batch])
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(classifier.parameters(), max_norm=1.0)
            optimizer.step()
            losses.append(loss.item())
        step_losses += losses
        epoch_losses.append(sum(losses) / len(losses))
        log(f"  [{model}/{reading} {implementation:8}] epoch {epoch:2}/{epochs}  "
            f"loss {epoch_losses[-1]:.4f}  test accuracy {accuracy(classifier, test_data):.4f}")
    seconds = time.perf_counter() - start
    int8_accuracy = None
    if implementation == "fastrnn":  # the trained model with int8 recurrences (fastrnn.quantized)
        int8_accuracy = accuracy(fastrnn.quantize_int8(classifier), test_data)
    return RunResult(step_losses, epoch_losses, accuracy(classifier, test_data), seconds,
                     int8_accuracy)


def compare(model: str, reading: str, *, log=print, **options) -> dict[str, RunResult]:
    """Train `model` on `reading` with torch.nn and with fastrnn from the same seed."""
    features = 8 if reading == "rows" else 1
    check_same_initial_weights(model, features, options.get("hidden", 64), options.get("seed", 0))
    return {implementation: train(model, reading, implementation, log=log, **options)
            for implementation in IMPLEMENTATIONS}


def report(model: str, reading: str, results: dict[str, RunResult]) -> str:
    """The two loss curves side by side and the test accuracies."""
    reference, candidate = results["torch.nn"], results["fastrnn"]
    lines = [f"{model}/{reading}: epoch   torch.nn loss   fastrnn loss   difference"]
    for epoch, (a, b) in enumerate(zip(reference.epoch_losses, candidate.epoch_losses), 1):
        lines.append(f"{'':{len(model) + len(reading) + 2}}  {epoch:5}   {a:13.6f}   {b:12.6f}"
                     f"   {b - a:+.2e}")
    lines.append(f"  test accuracy: torch.nn {reference.test_accuracy:.4f}  "
                 f"fastrnn {candidate.test_accuracy:.4f}   training time: torch.nn "
                 f"{reference.seconds:.1f} s  fastrnn {candidate.seconds:.1f} s")
    if candidate.int8_test_accuracy is not None:
        lines.append(f"  fastrnn made int8 (fastrnn.quantize_int8): test accuracy "
                     f"{candidate.int8_test_accuracy:.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastrnn.examples.digits",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--readings", nargs="+", choices=READINGS, default=list(READINGS))
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (default: 10 for rows, 20 for pixels)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=None,
                        help="train on the first N training images only")
    parser.add_argument("--backend", default=None, choices=fastrnn.backends.BACKEND_NAMES,
                        help="fastrnn backend (default: FASTRNN_BACKEND, else auto)")
    args = parser.parse_args(argv)
    print(f"fastrnn backends: {fastrnn.available_backends()}")
    reports = []
    for model in args.models:
        for reading in args.readings:
            print(f"{model} on {reading}:")
            results = compare(model, reading, epochs=args.epochs or DEFAULT_EPOCHS[reading],
                              hidden=args.hidden, batch_size=args.batch_size, lr=args.lr,
                              seed=args.seed, train_size=args.train_size, backend=args.backend)
            reports.append(report(model, reading, results))
            print(reports[-1])
    print("\nsummary")
    print("\n".join(reports))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
