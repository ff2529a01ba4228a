"""The report of the Keras benchmarks (test_keras_speed.py): per config and pass, Keras' layer's
fastest round, fastrnn.keras's and fastrnn's (called directly), and two ratios of paired rounds:
Keras / fastrnn.keras (the speed-up, > 1: fastrnn.keras is faster) and fastrnn.keras / fastrnn
(the cost of the Keras layer over fastrnn called directly, > 1: the Keras layer is slower)."""

from __future__ import annotations

from rnn_cases import aligned


def rows(timings: dict[tuple[str, str], dict[str, tuple]]) -> list[dict]:
    """From {(config, pass): {implementation: (min seconds, paired partner's min seconds)}}."""
    result = []
    for (label, pass_name), times in timings.items():
        row = {"config": label, "pass": pass_name}
        for name, (fastest, _) in times.items():
            row[f"{name}_min_ms"] = 1e3 * fastest
        fast, direct = times.get("fastrnn.keras"), times.get("fastrnn")
        row["speedup_vs_keras"] = fast[1] / fast[0] if fast and fast[1] else None
        row["keras_layer_over_fastrnn"] = direct[1] / direct[0] if direct and direct[1] else None
        result.append(row)
    return result


def table(report_rows: list[dict]) -> str:
    header = ["config", "pass", "keras ms", "fastrnn.keras ms", "fastrnn ms",
              "keras / fastrnn.keras", "fastrnn.keras / fastrnn"]
    keys = ["keras_min_ms", "fastrnn.keras_min_ms", "fastrnn_min_ms", "speedup_vs_keras",
            "keras_layer_over_fastrnn"]
    lines = [header]
    for row in report_rows:
        cells = [row["config"], row["pass"]]
        for key in keys:
            value = row.get(key)
            cells.append("-" if value is None else f"{value:.2f}")
        lines.append(cells)
    return aligned(lines, left=2)
