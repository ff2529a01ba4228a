"""Bad input gets torch.nn's own error, with torch's text (collected on torch 2.13)."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import fastrnn

CONSTRUCTOR_ERRORS = [
    (lambda m: m.LSTM(10, 20, dropout=1.5), ValueError, "dropout should be a number in range [0, 1] representing the probability of an element being zeroed"),
    (lambda m: m.LSTM(10, 20, dropout=True), ValueError, "dropout should be a number in range [0, 1]"),
    (lambda m: m.LSTM(10, 0), ValueError, "hidden_size must be greater than zero"),
    (lambda m: m.LSTM(10, 2.0), TypeError, "hidden_size should be of type int, got: float"),
    (lambda m: m.LSTM(0, 2), ValueError, "input_size must be greater than zero"),
    (lambda m: m.LSTM(10, 20, 0), ValueError, "num_layers must be greater than zero"),
    (lambda m: m.LSTM(10, 20, proj_size=-1), ValueError, "proj_size should be a positive integer or zero to disable projections"),
    (lambda m: m.LSTM(10, 20, proj_size=20), ValueError, "proj_size has to be smaller than hidden_size"),
    (lambda m: m.GRU(10, 20, proj_size=2), ValueError, "proj_size argument is only supported for LSTM, not RNN or GRU"),
    (lambda m: m.RNN(10, 20, nonlinearity="sigmoid"), ValueError, "Unknown nonlinearity 'sigmoid'. Select from 'tanh' or 'relu'."),
    (lambda m: m.LSTM(10, 20, bias=1), TypeError, "bias should be of type bool, got: int"),
    (lambda m: m.LSTM(10, 20, batch_first=1), TypeError, "batch_first should be of type bool, got: int"),
]


@pytest.mark.parametrize("make,error,text", CONSTRUCTOR_ERRORS, ids=[c[2][:40] for c in CONSTRUCTOR_ERRORS])
def test_constructor_errors_match_torch(make, error, text):
    for module in (nn, fastrnn):
        with pytest.raises(error, match=re.escape(text)):
            make(module)


def test_one_layer_dropout_warning_matches_torch():
    messages = []
    for module in (nn, fastrnn):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module.LSTM(10, 20, dropout=0.5)
        messages.append([str(w.message) for w in caught])
    assert messages[0] == messages[1] and len(messages[1]) == 1


x = torch.randn(5, 3, 10)
FORWARD_ERRORS = [
    ("LSTM", lambda m: m(torch.randn(5, 3, 7)), RuntimeError, "input.size(-1) must be equal to input_size. Expected 10, got 7"),
    ("LSTM", lambda m: m(torch.randn(10)), ValueError, "LSTM: Expected input to be 2D or 3D, got 1D instead"),
    ("LSTM", lambda m: m(torch.randn(1, 5, 3, 10)), ValueError, "LSTM: Expected input to be 2D or 3D, got 4D instead"),
    ("GRU", lambda m: m(torch.randn(10)), ValueError, "GRU: Expected input to be 2D or 3D, got 1D instead"),
    ("RNN", lambda m: m(torch.randn(10)), ValueError, "RNN: Expected input to be 2D or 3D, got 1D tensor instead"),
    ("LSTM", lambda m: m(x, (torch.randn(1, 3, 20), torch.randn(2, 3, 20))), RuntimeError, "Expected hidden[0] size (2, 3, 20), got [1, 3, 20]"),
    ("LSTM", lambda m: m(x, (torch.randn(2, 3, 20), torch.randn(2, 3, 21))), RuntimeError, "Expected hidden[1] size (2, 3, 20), got [2, 3, 21]"),
    ("LSTM", lambda m: m(x, (torch.randn(3, 20), torch.randn(3, 20))), RuntimeError, "For batched 3-D input, hx and cx should also be 3-D but got (2-D, 2-D) tensors"),
    ("LSTM", lambda m: m(torch.randn(5, 10), (torch.randn(2, 1, 20), torch.randn(2, 1, 20))), RuntimeError, "For unbatched 2-D input, hx and cx should also be 2-D but got (3-D, 3-D) tensors"),
    ("GRU", lambda m: m(x, torch.randn(3, 20)), RuntimeError, "For batched 3-D input, hx should also be 3-D but got 2-D tensor"),
    ("GRU", lambda m: m(torch.randn(5, 10), torch.randn(1, 1, 20)), RuntimeError, "For unbatched 2-D input, hx should also be 2-D but got 3-D tensor"),
    ("GRU", lambda m: m(x, torch.randn(1, 2, 20)), RuntimeError, "Expected hidden size (1, 3, 20), got [1, 2, 20]"),
    ("LSTM", lambda m: m(x.double()), ValueError, "RNN input dtype (torch.float64) does not match weight dtype (torch.float32). Convert input: input.to(torch.float32), or convert model: model.to(torch.float64)"),
    ("LSTM", lambda m: m(torch.randn(0, 3, 10)), RuntimeError, "Expected sequence length to be larger than 0 in RNN"),
    ("GRU", lambda m: m(torch.randn(0, 3, 10)), RuntimeError, "Expected sequence length to be larger than 0 in RNN"),
]


def _module(name, library):
    return {"LSTM": lambda: library.LSTM(10, 20, 2), "GRU": lambda: library.GRU(10, 20),
            "RNN": lambda: library.RNN(10, 20)}[name]()


@pytest.mark.parametrize("name,call,error,text", FORWARD_ERRORS, ids=[c[3][:45] for c in FORWARD_ERRORS])
def test_forward_errors_match_torch(name, call, error, text):
    for library in (nn, fastrnn):
        with pytest.raises(error, match=re.escape(text)):
            call(_module(name, library))


def test_packed_input_of_wrong_size_is_refused():
    # torch.nn's oneDNN path silently accepts this; fastrnn gives torch's padded-input error
    with pytest.raises(RuntimeError, match=re.escape("input.size(-1) must be equal to input_size. Expected 10, got 7")):
        fastrnn.LSTM(10, 20)(pack_sequence([torch.randn(3, 7)]))


def test_packed_hidden_state_of_wrong_batch_is_refused():
    packed = pack_sequence([torch.randn(3, 10), torch.randn(2, 10)])
    with pytest.raises(RuntimeError, match=re.escape("Expected hidden[0] size (1, 2, 20), got [1, 3, 20]")):
        fastrnn.LSTM(10, 20)(packed, (torch.randn(1, 3, 20), torch.randn(1, 3, 20)))


def test_hidden_state_of_other_dtype_is_refused():
    # torch.nn's message on the CPU (its GEMM's): tests/test_reliability.py has the other cells
    with pytest.raises(RuntimeError, match=re.escape("mat1 and mat2 must have the same dtype, but got Double and Float")):
        fastrnn.GRU(10, 20)(x, torch.randn(1, 3, 20, dtype=torch.float64))


CELL_ERRORS = [
    ("LSTMCell", lambda c: c(torch.randn(1, 3, 10)), ValueError, "LSTMCell: Expected input to be 1D or 2D, got 3D instead"),
    ("LSTMCell", lambda c: c(torch.randn(3, 7)), RuntimeError, "input has inconsistent input_size: got 7 expected 10"),
    ("LSTMCell", lambda c: c(torch.randn(3, 10), (torch.randn(1, 3, 20), torch.randn(3, 20))), ValueError, "LSTMCell: Expected hx[0] to be 1D or 2D, got 3D instead"),
    ("LSTMCell", lambda c: c(torch.randn(3, 10), (torch.randn(2, 20), torch.randn(2, 20))), RuntimeError, "Input batch size 3 doesn't match hidden0 batch size 2"),
    ("LSTMCell", lambda c: c(torch.randn(3, 10), (torch.randn(3, 21), torch.randn(3, 20))), RuntimeError, "hidden0 has inconsistent hidden_size: got 21, expected 20"),
    ("LSTMCell", lambda c: c(torch.randn(3, 10), (torch.randn(3, 20), torch.randn(3, 21))), RuntimeError, "hidden1 has inconsistent hidden_size: got 21, expected 20"),
    ("LSTMCell", lambda c: c(torch.randn(3, 10).double()), RuntimeError, "mat1 and mat2 must have the same dtype, but got Double and Float"),
    ("GRUCell", lambda c: c(torch.randn(1, 3, 10)), ValueError, "GRUCell: Expected input to be 1D or 2D, got 3D instead"),
    ("GRUCell", lambda c: c(torch.randn(3, 10), torch.randn(1, 3, 20)), ValueError, "GRUCell: Expected hidden to be 1D or 2D, got 3D instead"),
    ("GRUCell", lambda c: c(torch.randn(3, 10), torch.randn(2, 20)), RuntimeError, "Input batch size 3 doesn't match hidden0 batch size 2"),
    ("RNNCell", lambda c: c(torch.randn(3, 7)), RuntimeError, "input has inconsistent input_size: got 7 expected 10"),
    ("RNNCell", lambda c: c(torch.randn(3, 10), torch.randn(3, 20).double()), RuntimeError, "mat1 and mat2 must have the same dtype, but got Double and Float"),
]


@pytest.mark.parametrize("name,call,error,text", CELL_ERRORS, ids=[c[3][:45] for c in CELL_ERRORS])
def test_cell_errors_match_torch(name, call, error, text):
    for library in (nn, fastrnn):
        with pytest.raises(error, match=re.escape(text)):
            call(getattr(library, name)(10, 20))


def test_unknown_cell_nonlinearity_matches_torch():
    for library in (nn, fastrnn):
        with pytest.raises(RuntimeError, match="Unknown nonlinearity: x"):
            library.RNNCell(10, 20, nonlinearity="x")(torch.randn(3, 10))


def _outcome(call):
    """("ok", outputs) or (exception type, message) of call(), to compare torch.nn and fastrnn."""
    try:
        result = call()
    except Exception as error:  # noqa: BLE001 - the point is to compare whatever is raised
        return type(error), str(error)
    flat = [t for item in (result if isinstance(result, tuple) else (result,))
            for t in (item if isinstance(item, tuple) else (item,))]
    return "ok", [t.data if isinstance(t, torch.nn.utils.rnn.PackedSequence) else t for t in flat]


def _same_outcome(make, call, change=lambda module: None):
    """Run call on a torch.nn module and on fastrnn's copy of it (after change() on both); both
    raise the same error or both return the same values."""
    torch.manual_seed(0)
    theirs = make(nn)
    ours = type(make(fastrnn)).from_torch(theirs)
    change(theirs)
    change(ours)
    expected, got = _outcome(lambda: call(theirs)), _outcome(lambda: call(ours))
    assert got[0] == expected[0], (got, expected)
    if expected[0] == "ok":
        for g, e in zip(got[1], expected[1]):
            torch.testing.assert_close(g, e)
    else:
        assert got[1] == expected[1]


STATES = [torch.randn(1, 3, 20) for _ in range(3)]
UNBATCHED_STATES = [torch.randn(1, 20) for _ in range(3)]
PACKED = pack_sequence([torch.randn(4, 10) for _ in range(3)])
UNBATCHED = torch.randn(5, 10)
CELL_INPUT = torch.randn(3, 10)
HX_CALLS = {
    "batched-3": lambda m: m(x, tuple(STATES)),
    "batched-1": lambda m: m(x, tuple(STATES[:1])),
    "packed-3": lambda m: m(PACKED, tuple(STATES)),
    "unbatched-3": lambda m: m(UNBATCHED, tuple(UNBATCHED_STATES)),  # torch takes the first two
}
CELL_HX_CALLS = {
    "batched-3": lambda c: c(CELL_INPUT, tuple(s[0] for s in STATES)),
    "batched-1": lambda c: c(CELL_INPUT, (STATES[0][0],)),
    "unbatched-3": lambda c: c(CELL_INPUT[0], tuple(s[0] for s in UNBATCHED_STATES)),
    "unbatched-1": lambda c: c(CELL_INPUT[0], (UNBATCHED_STATES[0][0],)),
}


@pytest.mark.parametrize("kind", HX_CALLS)
def test_lstm_hx_of_other_than_two_states_matches_torch(kind):
    _same_outcome(lambda library: library.LSTM(10, 20), HX_CALLS[kind])


@pytest.mark.parametrize("kind", CELL_HX_CALLS)
def test_lstm_cell_hx_of_other_than_two_states_matches_torch(kind):
    _same_outcome(lambda library: library.LSTMCell(10, 20), CELL_HX_CALLS[kind])


PARAMETERS_SET_TO_NONE = [(name, parameter, inputs)
                          for name in ("LSTM", "GRU", "RNN")
                          for parameter in ("bias_hh_l0", "bias_ih_l0", "weight_hh_l0",
                                            "bias_hh_l1_reverse")
                          for inputs in ("padded", "packed", "unbatched")]


@pytest.mark.parametrize("name,parameter,inputs", PARAMETERS_SET_TO_NONE,
                         ids=["-".join(case) for case in PARAMETERS_SET_TO_NONE])
def test_parameter_set_to_none_matches_torch(name, parameter, inputs):
    data = {"padded": x, "packed": PACKED, "unbatched": UNBATCHED}[inputs]
    _same_outcome(lambda library: getattr(library, name)(10, 20, num_layers=2, bidirectional=True),
                  lambda module: module(data), lambda module: setattr(module, parameter, None))


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("parameter", ["bias_hh", "bias_ih", "weight_hh", "weight_ih"])
def test_cell_parameter_set_to_none_matches_torch(name, parameter):
    # a bias of None means no bias, in torch too
    _same_outcome(lambda library: getattr(library, name)(10, 20),
                  lambda cell: cell(CELL_INPUT), lambda cell: setattr(cell, parameter, None))
