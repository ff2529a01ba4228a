"""Where fastrnn keeps what it learns about the machine it runs on: compiled kernel resources and
admission verdicts, as small JSON files in FASTRNN_CACHE_DIR (default ~/.cache/fastrnn).
Writes are atomic (a temporary file renamed over the old one); an unwritable folder only means
that the next process learns the same things again."""

from __future__ import annotations

import json
import os
import threading


def path(name: str) -> str:
    """The path of cache file `name`."""
    folder = os.environ.get("FASTRNN_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "fastrnn")
    return os.path.join(folder, name)


def read_json(file: str) -> dict:
    """The JSON object in `file`, or {} where there is none (missing, unreadable, malformed)."""
    try:
        with open(file) as handle:
            found = json.load(handle)
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def update_json(file: str, entries: dict) -> None:
    """Merge `entries` into the JSON object in `file` (read, update, replace atomically)."""
    known = read_json(file)
    known.update(entries)
    try:
        os.makedirs(os.path.dirname(file), exist_ok=True)
        temporary = f"{file}.{os.getpid()}.{threading.get_ident()}"
        with open(temporary, "w") as handle:
            json.dump(known, handle)
        os.replace(temporary, file)
    except OSError:
        pass  # a read-only home: learned again next time
