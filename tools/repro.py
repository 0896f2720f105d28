"""`make repro`: `dvc repro` with the exit status a shell expects after an interrupt: 130 for Ctrl+C, 143 for SIGTERM.

A terminal's Ctrl+C reaches DVC and the running stage alike. The stage stops cleanly with 130 (olive_lab/cli.py), but
DVC ignores SIGINT while a stage runs, reports that the stage "exited with 130" and exits 255, so a script or a CI job
that checks the status sees a failure, not an interrupt. This wrapper runs DVC as a child in the same process group
(the terminal's signals still reach it directly), passes on a signal sent to the wrapper alone, and exits 128 + the
signal's number when one arrived.
"""

from __future__ import annotations

import signal
import subprocess
import sys


def main(argv: list[str]) -> int:
    received: list[int] = []
    child = subprocess.Popen(["dvc", "repro", *argv])

    def note(signum: int, _frame) -> None:
        received.append(signum)
        if child.poll() is None:
            child.send_signal(signum)  # a no-op for DVC mid-stage when the terminal already signalled the group

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, note)
    code = child.wait()
    if received:
        return 128 + received[0]
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
