"""The recurrent cells, described as data so that one recurrence driver serves them all.

Legend: B batch, T time, H hidden size, P output size of a step (proj_size or H), G gates,
D directions. Gate order matches torch.nn: LSTM i, f, g, o; GRU r, z, n; RNN a single gate.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class CellSpec:
    """What a backend needs to know about one kind of recurrent cell."""

    name: str  # op-name prefix: "lstm", "gru", "rnn_tanh", "rnn_relu"
    mode: str  # torch.nn mode string: "LSTM", "GRU", "RNN_TANH", "RNN_RELU"
    gates: int  # G: gate blocks of size H in weight_ih / weight_hh
    has_cell_state: bool  # LSTM carries c besides h
    workspace_gates: int  # saved [T, B, D, workspace_gates * H] per step for the backward

    @property
    def is_lstm(self) -> bool:
        return self.name == "lstm"

    @property
    def biases_share_gradient(self) -> bool:
        """Whether b_ih and b_hh only enter as their sum, so that their gradients are equal (not
        for GRU, whose b_hn is inside r * (W_hn h + b_hn))."""
        return self.name != "gru"


# Workspace contents per step and direction, in this order (all post-activation unless noted):
#   LSTM: i, f, g, o, c_t                      (5H)
#   GRU:  r, z, n, hn = W_hn h_{t-1} + b_hn    (4H, hn pre-activation)
#   RNN:  nothing: the backward reads h_t from the layer output  (0)
LSTM = CellSpec("lstm", "LSTM", 4, True, 5)
GRU = CellSpec("gru", "GRU", 3, False, 4)
RNN_TANH = CellSpec("rnn_tanh", "RNN_TANH", 1, False, 0)
RNN_RELU = CellSpec("rnn_relu", "RNN_RELU", 1, False, 0)

CELLS: dict[str, CellSpec] = {c.name: c for c in (LSTM, GRU, RNN_TANH, RNN_RELU)}
CELLS_BY_MODE: dict[str, CellSpec] = {c.mode: c for c in CELLS.values()}
