"""The DVC remote: a local Azurite for it, and push/pull that first check it in one fast request.

python -m tools.remote up            # Azurite on 127.0.0.1 (data in .azurite/), container created,
                                     # .dvc/config.local pointed at it (make remote-up)
python -m tools.remote down          # stop it, drop its connection string from .dvc/config.local
python -m tools.remote check         # one request to the remote, no retries: reachable, key valid, container there
python -m tools.remote push|pull [dvc args]   # check, then `dvc push|pull` (make push / make pull), stopped in
                                              # one line when the remote goes silent mid-transfer
"""

from __future__ import annotations

import sys

from olive_lab import paths
from olive_lab.azure.azurite import check, down, remote_arg, transfer, up
from olive_lab.cli import entry_point
from olive_lab.errors import StageError


@entry_point
def run(argv: list[str]) -> None:
    if not argv or argv[0] not in ("up", "down", "check", "push", "pull"):
        raise StageError("usage: python -m tools.remote up|down|check|push|pull [dvc args]")
    command, rest = argv[0], argv[1:]
    if command == "up":
        up(paths.AZURITE_STATE, paths.AZURITE_BIN)
    elif command == "down":
        down(paths.AZURITE_STATE, paths.DVC_LOCAL_CONFIG)
    else:
        check(remote_arg(rest))
        if command != "check":
            sys.exit(transfer(command, rest, paths.DVC_CACHE))


if __name__ == "__main__":
    run()
