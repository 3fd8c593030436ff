"""Signals around ``hpt-dsl run`` (``hpt_dsl.process.command_signals``), in a process of their own:
SIGTERM stops a command as Ctrl-C does, and a SIGTERM that arrives while the run is already
stopping on an error (a launcher's, after another process died) lets the error's message out."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from test_engine_run import ROOT

SCRIPT = """
import os, signal, sys, time
from hpt_dsl.process import StopFlag, command_signals

case = sys.argv[1]
try:
    with command_signals():
        if case == "setup":  # before the loop: interrupted at once
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            print("not interrupted")
        elif case == "loop":  # the loop's flag, then the command's handler again
            with StopFlag() as stop:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)
                print("flag", stop.set, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        else:  # stopping on an error: the launcher's SIGTERM lands during the clean-up
            try:
                try:
                    raise ConnectionError("Connection reset by peer")
                finally:
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.2)
            except ConnectionError as err:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)
                print("error:", err, flush=True)
                sys.exit(3)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
"""


def run(case: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", SCRIPT, case], capture_output=True, text=True, timeout=60, cwd=ROOT)


@pytest.mark.parametrize(
    ("case", "code", "said"),
    [
        ("setup", 130, "interrupted\n"),
        ("loop", 130, "flag True\ninterrupted\n"),
        ("error", 3, "error: Connection reset by peer\n"),
    ],
)
def test_sigterm_under_a_command(case: str, code: int, said: str) -> None:
    done = run(case)
    assert (done.returncode, done.stdout) == (code, said), done.stderr[-2000:]


def test_the_handlers_are_given_back() -> None:
    script = (
        "import os, signal, time\nfrom hpt_dsl.process import command_signals\n"
        "with command_signals():\n    pass\nos.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(5)\nprint('alive')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == -signal.SIGTERM and done.stdout == ""
