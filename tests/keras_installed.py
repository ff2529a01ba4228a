"""pytest plugin: run Keras' own layer tests with fastrnn serving Keras' recurrent layers.

    KERAS_BACKEND=torch PYTHONPATH=tests python -m pytest -p keras_installed <Keras' test files>

installs fastrnn.keras before the tests run and reports, at the end, how many calls of each
layer class fastrnn served and how many Keras' own code ran; the run fails if fastrnn served
none. `.ci/run` runs it on the tests in Keras' wheel (README: Keras).
"""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import fastrnn.keras  # noqa: E402


def pytest_configure(config):
    fastrnn.keras.install()


def _served() -> dict[str, int]:
    return {name: count for (name, by), count in fastrnn.keras.calls.items() if by == "fastrnn"}


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == 0 and not _served():
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
    terminalreporter.section("fastrnn.keras")
    for (name, by), count in sorted(fastrnn.keras.calls.items()):
        terminalreporter.write_line(f"{name}: {count} calls run by {by}")
    if not _served():
        terminalreporter.write_line("fastrnn served no call: install() did not take effect")
