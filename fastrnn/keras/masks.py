"""Keras' step masks as per-sequence lengths, and Keras' outputs at masked steps.

A Keras recurrent layer given a mask [B, T] skips the masked steps of each sequence: the state
carries over them unchanged, and the output there is the previous output (0 before the first
unmasked step), or 0 with `zero_output_for_mask`. Whatever the pattern (right padding, left
padding, holes, nothing left), that is a recurrence over each sequence's unmasked steps alone.
So the unmasked steps are moved to the front of each sequence (`MaskedSteps.packed`; nothing
moves where the mask is right padding), run by fastrnn with per-sequence lengths (0 to T), and
each step's output is then read back from the step Keras reports there.

Legend: B batch, T time, F features.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor


@dataclasses.dataclass
class MaskedSteps:
    """The unmasked steps of each sequence of a mask, in the order the layer reads them."""

    mask: Tensor  # [B, T] bool, True where a step is read
    lengths: Tensor  # [B] int64, the unmasked steps of each sequence
    order: Tensor | None  # [B, T] the step of each sequence's k-th unmasked step (unmasked
    # first, then masked), or None where the mask is right padding (each order is 0 .. T-1)

    @staticmethod
    def of(mask: Tensor) -> "MaskedSteps":
        """From a Keras mask [B, T] (bool, or numbers: nonzero is unmasked)."""
        mask = mask.to(torch.bool)
        order = None
        if bool((mask[:, 1:] > mask[:, :-1]).any()):  # an unmasked step after a masked one
            order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices
        return MaskedSteps(mask, mask.sum(1), order)

    def packed(self, x: Tensor) -> Tensor:
        """x [B, T, F] with each sequence's unmasked steps first, in their order."""
        if self.order is None:
            return x
        return x.gather(1, self.order.unsqueeze(2).expand(-1, -1, x.shape[2]))

    def outputs(self, output: Tensor, zero_output_for_mask: bool, reverse: bool = False,
                step: int | None = None) -> Tensor:
        """Keras' outputs [B, T, F] (or at one `step`: [B, F]) from fastrnn's `output` [B, T, F]
        of the packed sequences (0 from each sequence's length on). `reverse`: the output of a
        direction that reads the unmasked steps from last to first (fastrnn's direction 1), as a
        Keras layer with go_backwards does, given in the original step order; a masked step then
        shows the output of the next unmasked step (the one read before it)."""
        if self.order is None and (zero_output_for_mask or reverse) and step is None:
            return output  # right padding: fastrnn's output is Keras' already
        columns = slice(None) if step is None else slice(step, step + 1)
        mask = self.mask[:, columns]
        read_so_far = self.mask.cumsum(1)[:, columns]  # unmasked steps up to and including t
        if reverse:  # the packed index of the first unmasked step at or after t
            source = read_so_far - mask.to(read_so_far.dtype)
            present = source < self.lengths.unsqueeze(1)
        else:  # the packed index of the last unmasked step at or before t
            source = read_so_far - 1
            present = source >= 0
        if zero_output_for_mask:
            present = present & mask
        source = source.clamp(0, output.shape[1] - 1)
        found = output.gather(1, source.unsqueeze(2).expand(-1, -1, output.shape[2]))
        found = torch.where(present.unsqueeze(2), found, found.new_zeros(()))
        return found if step is None else found[:, 0]
