"""The Keras course models on a small text task, trained with Keras' layers and with fastrnn's.

Keras 3 on the torch backend (KERAS_BACKEND=torch is set here if unset); needs
`pip install "fastrnn[keras]"`. The data set is made here: sentences of 1/3 to all of T
words, right-padded with 0, from a vocabulary of neutral words, ten positive, ten negative and
"not" (which flips the next word); a sentence is positive (1) when its words sum above 0. Models
(MODELS; the layer sizes of the course at --units 128): lstm, gru_stack, bilstm, masked_lstm.

Each model is trained twice from the same seed, with keras.layers and with fastrnn.keras: the
layers create the same weights and see the same batches, so the loss curves agree to float32
noise; the times differ.

    python -m fastrnn.examples.keras_text [--models lstm bilstm] [--epochs 5] [--units 128]
                                          [--samples 1024] [--steps 80] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import fastrnn.keras  # noqa: E402

MODELS = {"lstm": "Embedding -> LSTM(units) -> Dense",
          "gru_stack": "Embedding -> GRU(2 units, return_sequences=True) -> SimpleRNN(units) "
                       "-> Dense",
          "bilstm": "Embedding -> Bidirectional(LSTM(units / 2)) -> Dense",
          "masked_lstm": "Embedding(mask_zero=True) -> LSTM(units) -> Dense"}
LIBRARIES = ("keras", "fastrnn")
VOCABULARY = 60  # 0 padding, 1 "not", 2-11 positive, 12-21 negative, the rest neutral
EMBEDDING = 32


@dataclasses.dataclass
class Dataset:
    """Token ids [N, T] (0 after each sentence's end) and labels [N] (0 or 1)."""

    tokens: np.ndarray
    labels: np.ndarray


def make_dataset(samples: int = 1024, steps: int = 80, seed: int = 0) -> Dataset:
    """Sentences with a sentiment label; see the module docstring."""
    generator = np.random.default_rng(seed)
    tokens = np.zeros((samples, steps), dtype="int32")
    labels = np.zeros(samples, dtype="float32")
    for row in range(samples):
        while True:
            length = generator.integers(max(1, steps // 3), steps + 1)
            words = generator.integers(1, VOCABULARY, length)
            sentiment = np.where((words >= 2) & (words < 12), 1,
                                 np.where((words >= 12) & (words < 22), -1, 0))
            negated = np.concatenate([[False], words[:-1] == 1])
            score = np.where(negated, -sentiment, sentiment).sum()
            if score != 0:
                break
        tokens[row, :length] = words
        labels[row] = float(score > 0)
    return Dataset(tokens, labels)


def build(name: str, library: str, units: int, steps: int) -> keras.Model:
    """One of MODELS, with keras.layers' recurrent layers or fastrnn.keras's."""
    layers = fastrnn.keras if library == "fastrnn" else keras.layers
    embedding = keras.layers.Embedding(VOCABULARY, EMBEDDING, mask_zero=name == "masked_lstm")
    if name in ("lstm", "masked_lstm"):
        recurrent = [layers.LSTM(units)]
    elif name == "gru_stack":
        recurrent = [layers.GRU(2 * units, return_sequences=True), layers.SimpleRNN(units)]
    elif name == "bilstm":
        recurrent = [layers.Bidirectional(layers.LSTM(max(1, units // 2)))]
    else:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return keras.Sequential([keras.Input((steps,), dtype="int32"), embedding, *recurrent,
                             keras.layers.Dense(1, activation="sigmoid")], name=name)


@dataclasses.dataclass
class Result:
    """One training run: the loss after each epoch, the seconds of each epoch, and accuracy on
    the training data at the end."""

    losses: list[float]
    epoch_seconds: list[float]
    accuracy: float
    initial_weights: list[np.ndarray]


class _EpochTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.start)


def train(name: str, library: str, data: Dataset, epochs: int = 5, batch_size: int = 32,
          units: int = 128, seed: int = 0) -> Result:
    """Train one model from `seed` (weights, batch order and dropout all follow it)."""
    keras.utils.set_random_seed(seed)
    model = build(name, library, units, data.tokens.shape[1])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy",
                  metrics=["accuracy"])
    initial_weights = model.get_weights()
    timer = _EpochTimer()
    history = model.fit(data.tokens, data.labels, epochs=epochs, batch_size=batch_size,
                        shuffle=True, verbose=0, callbacks=[timer])
    accuracy = model.evaluate(data.tokens, data.labels, verbose=0, return_dict=True)["accuracy"]
    return Result(history.history["loss"], timer.seconds, accuracy, initial_weights)


def compare(name: str, data: Dataset, epochs: int, batch_size: int, units: int, seed: int,
            log=print) -> dict[str, Result]:
    """Train `name` with both libraries from one seed; print both loss curves and times."""
    results = {library: train(name, library, data, epochs, batch_size, units, seed)
               for library in LIBRARIES}
    for first, second in zip(*(results[library].initial_weights for library in LIBRARIES)):
        if not np.array_equal(first, second):
            raise AssertionError(f"{name}: the two models did not start from the same weights")
    log(f"\n{name}: {MODELS[name]}, units {units}")
    log(f"  {'epoch':>5}  {'keras loss':>10}  {'fastrnn loss':>12}  {'keras s':>8}  "
        f"{'fastrnn s':>9}")
    keras_run, fast_run = results["keras"], results["fastrnn"]
    for epoch in range(epochs):
        log(f"  {epoch + 1:>5}  {keras_run.losses[epoch]:>10.5f}  {fast_run.losses[epoch]:>12.5f}"
            f"  {keras_run.epoch_seconds[epoch]:>8.2f}  {fast_run.epoch_seconds[epoch]:>9.2f}")
    keras_seconds, fast_seconds = sum(keras_run.epoch_seconds), sum(fast_run.epoch_seconds)
    log(f"  training time: keras {keras_seconds:.1f} s, fastrnn {fast_seconds:.1f} s "
        f"({keras_seconds / fast_seconds:.1f}x); accuracy: keras {keras_run.accuracy:.3f}, "
        f"fastrnn {fast_run.accuracy:.3f}")
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--units", type=int, default=128)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    data = make_dataset(args.samples, args.steps, args.seed)
    print(f"Keras {keras.__version__} ({keras.backend.backend()} backend); {args.samples} "
          f"sentences of up to {args.steps} words, {data.labels.mean():.0%} positive")
    for name in args.models:
        compare(name, data, args.epochs, args.batch_size, args.units, args.seed)


if __name__ == "__main__":
    main()
