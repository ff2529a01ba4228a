"""fastrnn.keras against Keras' own layers and against Keras' step semantics run with torch.nn's
cells: outputs and every gradient (input, initial states, each Keras variable) for every layer
option and mask pattern, in float64 and float32; fallbacks, dropout, statefulness, mixed
precision, Bidirectional, training with fit() and saving.

Judged as the README's fidelity rule says: float64 within 1e-12 of stock Keras where stock
Keras computes in float64 (LSTM and GRU without a mask), else within 1e-10 of the torch.nn
oracle (Keras' generic loop, which masks and SimpleRNN take, rounds float64 products to
float32); float32 no further from the float64 oracle than 2x torch.nn's float32 error plus 8
ulp of the tensor's scale.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":
    pytest.skip("fastrnn.keras needs KERAS_BACKEND=torch", allow_module_level=True)

import fastrnn.keras  # noqa: E402
from fastrnn.keras import layer_call, recurrence  # noqa: E402
from keras_cases import (Case, bidirectional_oracle, inputs, layer_pair,  # noqa: E402
                         mask_of, max_errors, oracle, run_keras)

FLOAT32_ULP = torch.finfo(torch.float32).eps

OPTIONS = [dict(), dict(return_sequences=True), dict(return_state=True),
           dict(return_sequences=True, go_backwards=True),
           dict(return_sequences=True, return_state=True, go_backwards=True),
           dict(use_bias=False, return_sequences=True), dict(unroll=True)]
MASKS = ["none", "right", "left", "holes", "empty"]


def _cases():
    cases = []
    for kind in ("lstm", "gru", "rnn"):
        for options in OPTIONS:
            for mask in MASKS:
                cases.append(Case(kind, dict(options), mask))
        cases += [Case(kind, dict(return_sequences=True, zero_output_for_mask=True), mask)
                  for mask in ("right", "left", "holes", "empty")]
        cases += [Case(kind, dict(return_state=True), mask, initial_state=True)
                  for mask in ("none", "holes")]
        cases += [Case(kind, dict(return_sequences=True), "holes", batch=1, steps=1,
                       input_size=1, units=1),
                  Case(kind, dict(return_sequences=True), "none", batch=1, steps=1),
                  Case(kind, dict(return_state=True), "left", batch=2, steps=9,
                       input_size=3, units=7)]
    cases.append(Case("rnn", dict(activation="relu", return_sequences=True), "holes"))
    cases.append(Case("rnn", dict(activation="relu"), "none"))
    return cases


CASES = _cases()


def _stock_is_float64(case: Case) -> bool:
    """Whether stock Keras computes this case in float64 (its LSTM/GRU loop without a mask)."""
    return case.kind != "rnn" and case.mask == "none"


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_float64(case):
    stock, fast = layer_pair(case, "float64")
    x, mask, states = inputs(case)
    ours = run_keras(fast, x, mask, states, "float64")
    errors = max_errors(ours, run_keras(stock, x, mask, states, "float64"))
    # where stock Keras rounds to float32, it still agrees to float32 (and so does the oracle)
    assert max(errors.values()) < (1e-12 if _stock_is_float64(case) else 1e-6), errors
    errors = max_errors(ours, oracle(case, fast, x, mask, states, "float64"))
    assert max(errors.values()) < 1e-10, errors


FLOAT32_CASES = CASES


@pytest.mark.parametrize("case", FLOAT32_CASES, ids=[case.id for case in FLOAT32_CASES])
def test_float32(case):
    _, fast = layer_pair(case, "float32")
    x, mask, states = inputs(case)
    expected = oracle(case, fast, x, mask, states, "float64")
    ours = max_errors(run_keras(fast, x, mask, states, "float32"), expected)
    torch_own = max_errors(oracle(case, fast, x, mask, states, "float32"), expected)
    for name, error in ours.items():
        assert error <= 2 * torch_own[name] + 8 * FLOAT32_ULP, (name, error, torch_own[name])


def test_served_by_fastrnn_not_keras(monkeypatch):
    """The calls above run fastrnn: Keras' own loop is never entered for a supported case."""
    def refuse(*args, **kwargs):
        raise AssertionError("Keras' own loop ran")

    for kind in ("lstm", "gru", "rnn"):
        monkeypatch.setitem(recurrence.KERAS_INNER_LOOP, kind, refuse)
        case = Case(kind, dict(return_sequences=True), "holes")
        _, fast = layer_pair(case, "float32")
        run_keras(fast, *inputs(case), "float32")


def test_inference_follows_assigned_weights():
    """Calls without gradients keep the weights in torch.nn's layout while the variables are
    unchanged, and see every assignment."""
    case = Case("gru", dict(return_sequences=True))
    stock, fast = layer_pair(case, "float64")
    x, _, _ = inputs(case)
    with torch.no_grad():
        for step in range(3):
            torch.testing.assert_close(fast(x), stock(x), rtol=0, atol=1e-12)
            for stock_weight, fast_weight in zip(stock.weights, fast.weights):
                value = np.random.default_rng(step).uniform(-0.5, 0.5, stock_weight.shape)
                stock_weight.assign(value)
                fast_weight.assign(value)
        fast.set_weights([w * 0.5 for w in stock.get_weights()])
        stock.set_weights(fast.get_weights())
        torch.testing.assert_close(fast(x), stock(x), rtol=0, atol=1e-12)


# ---- training-time options ----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_dropout_draws_keras_masks(kind):
    """dropout in training: the same seed gives Keras' masks and so Keras' results."""
    case = Case(kind, dict(dropout=0.4, seed=3, return_sequences=True))
    stock, fast = layer_pair(case, "float64")
    x, mask, states = inputs(case)
    tolerance = 1e-12 if kind != "rnn" else 1e-6  # stock SimpleRNN computes in float32
    for _ in range(2):  # the second call draws new masks, as Keras' does
        errors = max_errors(run_keras(fast, x, mask, states, "float64", training=True),
                            run_keras(stock, x, mask, states, "float64", training=True))
        assert max(errors.values()) < tolerance, errors


def test_recurrent_dropout_runs_keras_in_training_only():
    case = Case("lstm", dict(recurrent_dropout=0.3, seed=1, return_sequences=True))
    stock, fast = layer_pair(case, "float64")
    x, mask, states = inputs(case)
    recurrence._warned.clear()
    before = recurrence.calls.copy()
    with pytest.warns(UserWarning, match="recurrent_dropout > 0 in training.*Keras' own code"):
        trained = run_keras(fast, x, mask, states, "float64", training=True)
    errors = max_errors(trained, run_keras(stock, x, mask, states, "float64", training=True))
    assert max(errors.values()) == 0, errors
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        run_keras(fast, x, mask, states, "float64", training=True)
        inferred = run_keras(fast, x, mask, states, "float64", training=False)
    errors = max_errors(inferred, oracle(case, fast, x, mask, states, "float64"))
    assert max(errors.values()) < 1e-10, errors
    counted = recurrence.calls - before
    reason = "keras: has recurrent_dropout > 0 in training (fastrnn's kernels have no recurrent " \
             "dropout)"
    assert counted == {("LSTM", reason): 2, ("LSTM", "fastrnn"): 1}


FALLBACKS = [
    (Case("gru", dict(reset_after=False, return_sequences=True)), "reset_after=False"),
    (Case("lstm", dict(activation="relu")), "activation relu"),
    (Case("gru", dict(recurrent_activation="hard_sigmoid")), "recurrent_activation hard_sig"),
    (Case("rnn", dict(activation="sigmoid")), "activation sigmoid"),
    (Case("lstm", dict(use_cudnn=False), "holes"), "use_cudnn=False"),
]


@pytest.mark.parametrize("case, reason", FALLBACKS, ids=[case.id for case, _ in FALLBACKS])
def test_fallback_runs_keras_unchanged_and_says_so(case, reason):
    stock, fast = layer_pair(case, "float32")
    x, mask, states = inputs(case)
    recurrence._warned.clear()
    with pytest.warns(UserWarning, match=reason):
        ours = run_keras(fast, x, mask, states, "float32")
    assert max(max_errors(ours, run_keras(stock, x, mask, states, "float32")).values()) == 0


def test_custom_cell_runs_keras():
    """keras.layers.RNN over any cell is Keras' own code (fastrnn replaces LSTM, GRU and
    SimpleRNN layers only); an LSTM layer given another cell class falls back."""
    class Cell(keras.layers.LSTMCell):
        pass

    layer = fastrnn.keras.LSTM(3)
    layer.build((2, 4, 3))
    layer.cell.__class__ = Cell
    recurrence._warned.clear()
    with pytest.warns(UserWarning, match="cell of class Cell"):
        layer(np.ones((2, 4, 3), "float32"))


def test_stateful_carries_state_and_trains():
    case = Case("lstm", dict(stateful=True, return_sequences=True))
    stock, fast = layer_pair(case, "float64")
    x, _, _ = inputs(case)
    for _ in range(3):  # each call starts from the state the last one ended in
        expected = stock(x)
        torch.testing.assert_close(fast(x), expected, rtol=0, atol=1e-12)
    for variable in fast.states:  # the state variables are Keras', assigned by Keras
        assert isinstance(variable, keras.Variable)
    # training: Keras' own CPU loop fails in backward here ("modified by an inplace
    # operation"), so the gradients are held to Keras' layer given the same state explicitly
    state = [variable.value.detach().numpy().copy() for variable in fast.states]
    ours = run_keras(fast, x, None, None, "float64", training=True)
    plain = Case("lstm", dict(return_sequences=True))
    stock_plain, fast_plain = layer_pair(plain, "float64")
    expected = run_keras(stock_plain, x, None, state, "float64", training=True)
    expected = {name: value for name, value in expected.items() if "state" not in name}
    assert max(max_errors(ours, expected).values()) < 1e-12
    for variable, before in zip(fast.states, state):  # and the state moved on
        assert not np.allclose(variable.value.detach().numpy(), before)
    fast.reset_state()
    stock.reset_state()
    torch.testing.assert_close(fast(x), stock(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    case = Case("lstm", dict(return_sequences=True, dtype=policy), "right")
    stock = keras.layers.LSTM(case.units, **case.options)
    fast = fastrnn.keras.LSTM(case.units, **case.options)
    stock.build((None, case.steps, case.input_size))
    fast.build((None, case.steps, case.input_size))
    for stock_weight, fast_weight in zip(stock.weights, fast.weights):
        fast_weight.assign(stock_weight.value)
        assert fast_weight.dtype == "float32"
    x, mask, _ = inputs(case)
    x = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    mask = torch.tensor(mask)
    ours, theirs = fast(x, mask=mask), stock(x, mask=mask)
    assert ours.dtype == theirs.dtype == (torch.float16 if "16" in policy and "bf" not in policy
                                          else torch.bfloat16)
    float64 = fastrnn.keras.LSTM(case.units, return_sequences=True, dtype="float64")
    float64.build((None, case.steps, case.input_size))
    for stock_weight, weight in zip(stock.weights, float64.weights):
        weight.assign(stock_weight.value)
    exact = float64(x.double(), mask=mask)
    assert (ours.double() - exact).abs().max() <= 2 * (theirs.double() - exact).abs().max() + 1e-2
    ours.float().sum().backward()
    assert fast.cell.kernel.value.grad.dtype == torch.float32


# ---- Bidirectional ------------------------------------------------------------------------
BIDIRECTIONAL = [(kind, options, mask) for kind in ("lstm", "gru", "rnn")
                 for options, mask in (
                     (dict(), "none"), (dict(return_sequences=True), "none"),
                     (dict(return_sequences=True), "holes"),
                     (dict(return_state=True), "right"),
                     (dict(return_sequences=True, merge_mode="sum"), "empty"),
                     (dict(return_sequences=True, merge_mode="ave"), "left"),
                     (dict(merge_mode="mul"), "holes"),
                     (dict(return_state=True, merge_mode=None), "left"),
                     (dict(return_sequences=True, return_state=True, initial_state=True),
                      "none"),
                     (dict(return_state=True, initial_state=True), "holes"))]


def _bidirectional_pair(kind, options, mask, dtype):
    """(case, Keras' Bidirectional, fastrnn's, x, mask, initial states (forward's, then
    backward's) or None), with the same weights."""
    options = dict(options)
    merge_mode = options.pop("merge_mode", "concat")
    initial_state = options.pop("initial_state", False)
    case = Case(kind, options, mask, initial_state=initial_state)
    stock_layer, fast_layer = layer_pair(case, dtype)
    stock = keras.layers.Bidirectional(stock_layer, merge_mode=merge_mode, dtype=dtype)
    fast = fastrnn.keras.Bidirectional(fast_layer, merge_mode=merge_mode, dtype=dtype)
    for layer in (stock, fast):
        layer.build((None, case.steps, case.input_size))
    for stock_weight, fast_weight in zip(stock.weights, fast.weights):
        fast_weight.assign(stock_weight.value)
    assert type(fast.forward_layer) is type(fast_layer)  # Keras rebuilt it by its config
    x, mask_value, states = inputs(case)
    if states is not None:  # the backward layer's states differ from the forward layer's
        states = states + [-0.5 * state for state in states]
    return case, stock, fast, x, mask_value, states


def _bidirectional_id(kind, options, mask):
    return f"{kind}-{'-'.join(f'{n}={v}' for n, v in options.items())}-{mask}"


def _one_call(monkeypatch):
    """Make Keras' Bidirectional.call (the two layers one by one) fail if fastrnn's runs it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the layers ran one by one")

    monkeypatch.setattr(recurrence, "KERAS_BIDIRECTIONAL_CALL", refuse)


@pytest.mark.parametrize("kind, options, mask", BIDIRECTIONAL,
                         ids=[_bidirectional_id(*case) for case in BIDIRECTIONAL])
def test_bidirectional_is_one_call_and_equals_keras(kind, options, mask, monkeypatch):
    case, stock, fast, x, mask_value, states = _bidirectional_pair(kind, options, mask,
                                                                   "float64")
    _one_call(monkeypatch)
    ours = run_keras(fast, x, mask_value, states, "float64")
    monkeypatch.undo()
    theirs = run_keras(stock, x, mask_value, states, "float64")
    errors = max_errors(ours, theirs)
    assert max(errors.values()) < (1e-12 if _stock_is_float64(case) else 1e-6), errors
    errors = max_errors(ours, bidirectional_oracle(case, fast, x, mask_value, states,
                                                   "float64"))
    assert max(errors.values()) < 1e-10, errors


@pytest.mark.parametrize("kind, options, mask", BIDIRECTIONAL,
                         ids=[_bidirectional_id(*case) for case in BIDIRECTIONAL])
def test_bidirectional_float32(kind, options, mask, monkeypatch):
    case, _, fast, x, mask_value, states = _bidirectional_pair(kind, options, mask, "float32")
    expected = bidirectional_oracle(case, fast, x, mask_value, states, "float64")
    _one_call(monkeypatch)
    ours = max_errors(run_keras(fast, x, mask_value, states, "float32"), expected)
    torch_own = max_errors(bidirectional_oracle(case, fast, x, mask_value, states, "float32"),
                           expected)
    for name, error in ours.items():
        assert error <= 2 * torch_own[name] + 8 * FLOAT32_ULP, (name, error, torch_own[name])


def test_bidirectional_with_dropout_runs_two_fastrnn_layers():
    layer = fastrnn.keras.Bidirectional(fastrnn.keras.GRU(4, dropout=0.2, seed=0))
    before = recurrence.calls.copy()
    layer(np.ones((2, 5, 3), "float32"), training=True)
    assert recurrence.calls - before == {("GRU", "fastrnn"): 2}


# ---- __call__ -------------------------------------------------------------------------------
def _layer_of(name: str, library, **options):
    if name == "Bidirectional":
        return library.Bidirectional(library.LSTM(5, **options))
    return getattr(library, name)(5, **options)


def _refuse_keras_call(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Keras' Layer.__call__ ran")

    monkeypatch.setattr(layer_call, "KERAS_LAYER_CALL", refuse)


@pytest.mark.parametrize("name", ["LSTM", "GRU", "SimpleRNN", "Bidirectional"])
@pytest.mark.parametrize("options", [dict(return_sequences=True), dict(return_state=True)],
                         ids=["sequences", "state"])
def test_call_passes_through_as_keras_call(name, options, monkeypatch):
    """An eager call that Keras' Layer.__call__ would only pass on skips it and gives what it
    gives: outputs, the mask read from the input, the output masks."""
    generator = np.random.default_rng(0)
    x = torch.tensor(generator.standard_normal((3, 6, 4)), dtype=torch.float32)
    mask = torch.tensor(mask_of("holes", 3, 6, generator))
    stock, fast = _layer_of(name, keras.layers, **options), _layer_of(name, fastrnn.keras,
                                                                       **options)
    stock.build(x.shape)
    fast.build(x.shape)
    fast.set_weights(stock.get_weights())
    for arguments in (dict(mask=mask, training=True), dict(training=False), {}):
        keras.src.backend.set_keras_mask(x, mask)  # as Embedding(mask_zero=True) leaves it
        expected = keras.tree.flatten(stock(x, **arguments))
        _refuse_keras_call(monkeypatch)
        got = keras.tree.flatten(fast(x, **arguments))
        monkeypatch.undo()
        for ours, theirs in zip(got, expected, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
            their_mask = getattr(theirs, "_keras_mask", None)
            if their_mask is None:
                assert getattr(ours, "_keras_mask", None) is None
            else:
                assert torch.equal(ours._keras_mask, their_mask)


def test_call_passes_training_on_as_keras_call():
    """Outer layers see the `training` a passed-through call resolved, as with Keras'."""
    class Outer(keras.layers.Layer):
        def __init__(self, rnn):
            super().__init__()
            self.rnn, self.dropout = rnn, keras.layers.Dropout(0.5, seed=1)

        def call(self, x):
            return self.dropout(self.rnn(x, training=True))  # Dropout takes training from it

    x = np.random.default_rng(1).standard_normal((4, 5, 3)).astype("float32")
    stock, fast = Outer(keras.layers.GRU(6)), Outer(fastrnn.keras.GRU(6))
    stock(x)
    fast(x)
    fast.set_weights(stock.get_weights())
    before = recurrence.calls.copy()
    theirs, ours = stock(x), fast(x)
    assert recurrence.calls - before == {("GRU", "fastrnn"): 1}
    assert (theirs == 0).any()  # dropped
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def _forward_hook(layer, args, kwargs, output):
    layer.hook_ran = True


PASSED_TO_KERAS = {
    "numpy input": lambda layer, x: layer(x.numpy()),
    "float64 input": lambda layer, x: layer(x.double()),
    "initial state": lambda layer, x: layer(x, initial_state=[torch.ones(3, 5)]),
    "a float mask": lambda layer, x: layer(x, mask=torch.ones(3, 6)),
    "a forward hook": lambda layer, x: (
        layer.register_forward_hook(_forward_hook, with_kwargs=True), layer(x),
        layer.__dict__.pop("hook_ran")),
}


@pytest.mark.parametrize("case", PASSED_TO_KERAS)
def test_other_calls_run_keras_call(case, monkeypatch):
    """Any call that Keras' Layer.__call__ does more for runs Keras' own __call__."""
    layer = fastrnn.keras.GRU(5)
    x = torch.randn(3, 6, 4)
    layer(x)
    entered = []
    monkeypatch.setattr(layer_call, "KERAS_LAYER_CALL",
                        lambda *args, **kwargs: entered.append(1) or
                        keras.layers.Layer.__call__(*args, **kwargs))
    PASSED_TO_KERAS[case](layer, x)
    assert entered == [1]


def test_call_passes_through_only_on_tested_keras(monkeypatch):
    layer = fastrnn.keras.LSTM(5)
    layer(torch.randn(3, 6, 4))
    monkeypatch.setattr(layer_call, "_TAKES_THIS_PATH", False)
    entered = []
    monkeypatch.setattr(layer_call, "KERAS_LAYER_CALL",
                        lambda *args, **kwargs: entered.append(1) or
                        keras.layers.Layer.__call__(*args, **kwargs))
    layer(torch.randn(3, 6, 4))
    assert entered == [1]


# ---- models: training, saving, loading -------------------------------------------------------
def test_fit_gives_keras_loss_curve():
    from fastrnn.examples import keras_text

    data = keras_text.make_dataset(samples=64, steps=12, seed=0)
    for name in keras_text.MODELS:
        lines = []
        before = recurrence.calls.copy()
        results = keras_text.compare(name, data, epochs=5, batch_size=32, units=8, seed=0,
                                     log=lines.append)
        ran = recurrence.calls - before
        assert ran and all(by == "fastrnn" for _, by in ran), (name, ran)
        np.testing.assert_allclose(results["fastrnn"].losses, results["keras"].losses,
                                   rtol=2e-4, atol=1e-5, err_msg=name)
        assert len(lines) == 8 and "training time: keras" in lines[-1]


def _encoder_decoder(library: str, dropout: float) -> keras.Model:
    """A sequence-to-sequence model: a masked GRU encoder's state starts an LSTM decoder
    (return_state=True feeding initial_state), input dropout on both."""
    layers = fastrnn.keras if library == "fastrnn" else keras.layers
    keras.utils.set_random_seed(0)
    source = keras.Input((9,), dtype="int32")
    target = keras.Input((6, 3))
    embedded = keras.layers.Embedding(15, 5, mask_zero=True)(source)
    _, state = layers.GRU(8, return_state=True, dropout=dropout)(embedded)
    decoded, _, _ = layers.LSTM(8, return_sequences=True, return_state=True,
                                dropout=dropout)(target, initial_state=[state, state])
    model = keras.Model([source, target], keras.layers.Dense(3)(decoded))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return model


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fit_encoder_decoder_gives_keras_loss_curve(dropout):
    generator = np.random.default_rng(0)
    source = generator.integers(1, 15, (48, 9))
    source[np.arange(9) >= generator.integers(2, 10, (48, 1))] = 0  # right padding
    target = generator.standard_normal((48, 6, 3)).astype("float32")
    labels = generator.standard_normal((48, 6, 3)).astype("float32")
    losses = {}
    for library in ("keras", "fastrnn"):
        model = _encoder_decoder(library, dropout)
        before = recurrence.calls.copy()
        history = model.fit([source, target], labels, epochs=5, batch_size=16, shuffle=True,
                            verbose=0)
        losses[library] = history.history["loss"]
        if library == "fastrnn":
            ran = recurrence.calls - before
            assert ran and all(by == "fastrnn" for _, by in ran), ran
    np.testing.assert_allclose(losses["fastrnn"], losses["keras"], rtol=2e-4, atol=1e-5)


def _model(library: str):
    layers = fastrnn.keras if library == "fastrnn" else keras.layers
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((7,), dtype="int32"),
        keras.layers.Embedding(20, 6, mask_zero=True, name="embedding"),
        layers.Bidirectional(layers.LSTM(5, return_sequences=True, name="lstm"), name="bi"),
        layers.GRU(4, return_sequences=True, name="gru"),
        layers.SimpleRNN(3, name="simple_rnn"),
        keras.layers.Dense(2, name="dense"),
    ])


def _unnamed(config):
    """A config without the module and registered name of the classes nested in it."""
    if isinstance(config, dict):
        return {key: _unnamed(value) for key, value in config.items()
                if key not in ("module", "registered_name")}
    return config


def test_save_and_load_both_ways(tmp_path):
    x = np.random.default_rng(0).integers(0, 20, (4, 7))
    x[:, 5:] = 0
    stock, fast = _model("keras"), _model("fastrnn")
    fast.set_weights(stock.get_weights())
    expected = stock.predict(x, verbose=0)
    np.testing.assert_allclose(fast.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)
    # fastrnn's layers save configs equal to Keras' own, under fastrnn's registered names
    for stock_layer, fast_layer in zip(stock.layers, fast.layers):
        assert _unnamed(stock_layer.get_config()) == _unnamed(fast_layer.get_config())
    stock.save(tmp_path / "stock.keras")
    fast.save(tmp_path / "fast.keras")

    loaded = keras.saving.load_model(tmp_path / "fast.keras")  # back into fastrnn's layers
    assert type(loaded.layers[1].forward_layer) is fastrnn.keras.LSTM
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)
    into_fast = _model("fastrnn")  # Keras' file into fastrnn's layers
    into_fast.load_weights(tmp_path / "stock.keras")
    np.testing.assert_allclose(into_fast.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)
    into_stock = _model("keras")  # and fastrnn's file into Keras' layers
    into_stock.load_weights(tmp_path / "fast.keras")
    np.testing.assert_allclose(into_stock.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)
    np.save(tmp_path / "x.npy", x)  # fastrnn's file where fastrnn is not installed: Keras' classes
    code = ("import sys, keras, numpy as np; path = sys.argv[1]; "
            "names = ('LSTM', 'GRU', 'SimpleRNN', 'Bidirectional'); "
            "model = keras.saving.load_model(path + '/fast.keras', custom_objects={"
            "f'fastrnn>{n}': getattr(keras.layers, n) for n in names}); "
            "assert type(model.layers[1].forward_layer) is keras.layers.LSTM; "
            "assert not any(m.startswith('fastrnn') for m in sys.modules); "
            "np.save(path + '/y.npy', model.predict(np.load(path + '/x.npy'), verbose=0))")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True,
                   env={**os.environ, "KERAS_BACKEND": "torch"})
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-5, atol=1e-6)

    fastrnn.keras.install()  # Keras' file, Keras' classes, run on fastrnn
    try:
        installed = keras.saving.load_model(tmp_path / "stock.keras")
        before = recurrence.calls.copy()
        np.testing.assert_allclose(installed.predict(x, verbose=0), expected, rtol=1e-5,
                                   atol=1e-6)
        assert {name for name, _ in recurrence.calls - before} == {"Bidirectional", "GRU",
                                                                    "SimpleRNN"}
    finally:
        fastrnn.keras.uninstall()


# ---- install() ------------------------------------------------------------------------------
def _keras_methods():
    from keras.src.layers.rnn import bidirectional, gru, lstm, rnn, simple_rnn
    classes = {"LSTM": lstm.LSTM, "GRU": gru.GRU, "SimpleRNN": simple_rnn.SimpleRNN,
               "RNN": rnn.RNN, "Bidirectional": bidirectional.Bidirectional}
    return {(name, method): layer_class.__dict__.get(method)
            for name, layer_class in classes.items()
            for method in ("inner_loop", "call", "__call__")}


def test_install_and_uninstall():
    original = _keras_methods()
    assert original["SimpleRNN", "inner_loop"] is None  # Keras' inherits RNN.inner_loop
    existing = keras.layers.GRU(3, return_sequences=True)
    fastrnn.keras.install()
    try:
        fastrnn.keras.install()  # a second call changes nothing
        assert fastrnn.keras.is_installed()
        patched = _keras_methods()
        assert patched["RNN", "inner_loop"] is recurrence.rnn_inner_loop
        assert patched["RNN", "call"] is original["RNN", "call"]
        for name in ("LSTM", "GRU", "SimpleRNN"):
            assert patched[name, "inner_loop"] is recurrence.inner_loop
            assert patched[name, "call"] is recurrence.call
        assert patched["Bidirectional", "call"] is recurrence.bidirectional_call
        assert patched["Bidirectional", "inner_loop"] is None
        for name in ("LSTM", "GRU", "SimpleRNN", "Bidirectional"):
            assert patched[name, "__call__"] is layer_call.layer_call
        assert patched["RNN", "__call__"] is None
        before = recurrence.calls.copy()
        existing(np.ones((2, 4, 3), "float32"))  # a layer made before install() runs on fastrnn
        keras.layers.SimpleRNN(2)(np.ones((2, 4, 3), "float32"))
        assert recurrence.calls - before == {("GRU", "fastrnn"): 1, ("SimpleRNN", "fastrnn"): 1}
        # keras.layers.RNN over a cell: Keras' own loop, unchanged, said once per cell class
        x = np.random.default_rng(0).standard_normal((2, 4, 3)).astype("float32")
        cell = keras.layers.GRUCell(3)
        layer = keras.layers.RNN(cell, return_sequences=True)
        recurrence._warned.clear()
        before = recurrence.calls.copy()
        with pytest.warns(UserWarning, match="RNN runs a cell of class GRUCell.*Keras' own code"):
            ours = layer(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            layer(x)
        reason = ("keras: runs a cell of class GRUCell (fastrnn runs Keras' LSTM, GRU and "
                  "SimpleRNN layers, not keras.layers.RNN)")
        assert recurrence.calls - before == {("RNN", reason): 2}
        # an LSTM that falls back reaches RNN.inner_loop through Keras' own LSTM.inner_loop
        before = recurrence.calls.copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # said already, or now: either is right here
            keras.layers.LSTM(2, use_cudnn=False)(x)
        assert {by for _, by in recurrence.calls - before} == {
            "keras: has use_cudnn=False, which asks for Keras' own loop"}
        assert keras.layers.LSTM is type(keras.layers.LSTM(2))  # classes stay Keras' own
    finally:
        fastrnn.keras.uninstall()
    assert _keras_methods() == original
    assert not fastrnn.keras.is_installed()
    before = recurrence.calls.copy()
    existing(np.ones((2, 4, 3), "float32"))
    np.testing.assert_array_equal(layer(x).detach().numpy(), ours.detach().numpy())
    assert recurrence.calls == before


def test_install_refuses_an_unknown_keras(monkeypatch):
    original = _keras_methods()
    monkeypatch.setattr(keras, "__version__", "3.99.0")
    with pytest.raises(RuntimeError, match="tested with Keras 3.15.*this is Keras 3.99.0, so "
                                           "nothing was patched"):
        fastrnn.keras.install()
    assert _keras_methods() == original and not fastrnn.keras.is_installed()
    monkeypatch.undo()

    from keras.src.layers.rnn.gru import GRU

    def changed(self, sequences, initial_state, mask, training=False, extra=None):
        pass

    monkeypatch.setattr(GRU, "inner_loop", changed)  # a Keras whose method changed
    with pytest.raises(RuntimeError, match="GRU.inner_loop is not the method"):
        fastrnn.keras.install()
    monkeypatch.undo()
    assert _keras_methods() == original and not fastrnn.keras.is_installed()


def test_nothing_else_imports_keras():
    code = ("import sys, fastrnn, fastrnn.functional, fastrnn.modules, fastrnn.examples.digits; "
            "import fastrnn.backends.cpu, fastrnn.admission, fastrnn.profile; "
            "assert not any(m == 'keras' or m.startswith('keras.') for m in sys.modules), "
            "[m for m in sys.modules if m.startswith('keras')]")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_other_keras_backends_get_a_clear_error():
    code = "import keras; keras.backend.backend = lambda: 'jax'; import fastrnn.keras"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "fastrnn.keras runs Keras on its torch backend, but Keras uses 'jax'" in result.stderr
