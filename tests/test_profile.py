"""Smoke test of `python -m fastrnn.profile` on CPU."""

import json

from fastrnn import profile


def test_profile_prints_table_and_writes_trace(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    profile.main(["--cell", "lstm", "--batch", "2", "--seq", "4", "--hidden", "8", "--layers", "2",
                  "--bidirectional", "--backend", "reference", "--device", "cpu", "--iters", "2",
                  "--warmup", "1", "--trace", str(trace)])
    printed = capsys.readouterr().out
    assert "Self CPU time total" in printed
    assert "forward" in printed and "backward" in printed
    assert json.loads(trace.read_text())["traceEvents"]
