"""The digits example trains to the same place with torch.nn and with fastrnn."""

import pytest
import torch

pytest.importorskip("sklearn")

from fastrnn.examples import digits  # noqa: E402


@pytest.mark.parametrize("model, reading", [("lstm", "rows"), ("bilstm", "rows"),
                                            ("gru", "pixels")])
def test_torch_and_fastrnn_train_alike(model, reading):
    results = digits.compare(model, reading, epochs=2, hidden=16, batch_size=32, train_size=160,
                             seed=0, log=lambda line: None)
    reference, candidate = results["torch.nn"], results["fastrnn"]
    torch.testing.assert_close(candidate.step_losses[:5], reference.step_losses[:5],
                               rtol=1e-4, atol=1e-5)
    assert abs(candidate.test_accuracy - reference.test_accuracy) <= 0.02


def test_same_seed_gives_same_initial_weights():
    for model in digits.MODELS:
        digits.check_same_initial_weights(model, features=8, hidden=16, seed=3)
