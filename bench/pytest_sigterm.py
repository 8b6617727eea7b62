"""pytest plugin for bench/gpu.sh (`-p pytest_sigterm`): SIGTERM, which a stage's `timeout` sends
when its budget runs out, ends the session as Ctrl-C does, so pytest still writes what finished
(JUnit XML, pytest-benchmark JSON) instead of dying with nothing written."""

import signal


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}: the stage's time budget ran out")


def pytest_configure(config):
    signal.signal(signal.SIGTERM, _interrupt)
