"""The DVC remote on Azure Blob: a local Azurite server for it, and a check that fails fast when it is misconfigured.

Why the check: on a wrong endpoint DVC's Azure client retries for ~85 s and then prints a multi-line "unexpected
error"; one request without retries answers the same question in a second or two, in one line. Real transfers then
run with DVC's own retries. (Remote options cannot do this: dvc-azure 3.1.1 accepts `timeout`, `connection_timeout`
and `read_timeout` but does not pass them on to its client, and has no retry setting.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from olive_lab.errors import StageError

log = logging.getLogger(__name__)
ACCOUNT = "devstoreaccount1"
# Azurite's documented development key (public, the same on every machine): not a secret.
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
CONNECT_S = 5  # TCP/TLS connect of the check request
READ_S = 8  # waiting for the answer of the check request (listing at most one blob)
START_S = 30  # for Azurite to listen
# During `make push/pull`: one probe of the remote every PROBE_S, each given PROBE_CONNECT_S + PROBE_READ_S; no answer
# for STALL_S stops the transfer. A live remote answers a listing in milliseconds, even while DVC is sending to it.
PROBE_S = 1
PROBE_CONNECT_S = 2
PROBE_READ_S = 3
STALL_S = 8


def connection_string(port: int) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={DEV_KEY};"
        f"BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT};"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_azurite(exe: Path, port: int, data_dir: Path | None, log_file: Path | None = None) -> subprocess.Popen:
    """Start Azurite's blob service (`exe`: node_modules/.bin/azurite-blob) on 127.0.0.1:port and wait until it
    listens. data_dir None: in memory."""
    if not shutil.which("node"):
        raise StageError("node not found: Azurite needs Node.js >= 18 (e.g. apt-get install nodejs npm)")
    if not exe.exists():
        raise StageError(f"{exe} not found: run `npm ci` in the repository root (make setup does)")
    args = [str(exe), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--skipApiVersionCheck", "--disableTelemetry"]
    # In memory: cap it well below Azurite's default of half the machine's RAM.
    args += ["--location", str(data_dir)] if data_dir else ["--inMemoryPersistence", "--extentMemoryLimit", "1024"]
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115 (the child keeps it)
    proc = subprocess.Popen(
        args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            where = f" (see {log_file})" if log_file else ""
            raise StageError(f"Azurite exited with status {proc.returncode} before listening on port {port}{where}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.2)
    stop(proc.pid)
    raise StageError(f"Azurite did not listen on 127.0.0.1:{port} within {START_S} s")


def alive(pid: int) -> bool:
    """An Azurite process runs under this pid (not a zombie, not a recycled pid)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z" and b"azurite" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return False


def stop(pid: int) -> None:
    """SIGTERM the server's process group (node and its children), SIGKILL after 5 s."""
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 2)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:  # not our child (started by an earlier `up`): poll instead
                if not alive(pid):
                    return
            time.sleep(0.1)


def create_container(conn_str: str, name: str) -> None:
    from azure.core.exceptions import ResourceExistsError
    from azure.storage.blob import BlobServiceClient

    with (
        BlobServiceClient.from_connection_string(conn_str, retry_total=0) as client,
        contextlib.suppress(ResourceExistsError),
    ):
        client.create_container(name)


def dvc(*args: str, cwd: Path | None = None) -> None:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise StageError(f"dvc {' '.join(args[:3])}: {(proc.stderr or proc.stdout).strip().splitlines()[0]}")


def remote_url(name: str | None = None) -> tuple[str, str]:
    """(remote name, url) of the named remote, or of the default one."""
    from dvc.config import Config

    config = Config.from_cwd()
    name = name or config["core"].get("remote")
    if not name:
        raise StageError(".dvc/config: no default remote (core.remote)")
    if name not in config["remote"]:
        raise StageError(f".dvc/config: no remote named '{name}'")
    return name, config["remote"][name]["url"]


def up(state: Path, exe: Path) -> None:
    """Start Azurite with its data in `state` (unless it already runs), create the remote's container and point the
    default remote at it in .dvc/config.local."""
    name, url = remote_url()
    container = url.removeprefix("azure://").split("/")[0]
    pid_file = state / "azurite.pid"
    pid, port = map(int, pid_file.read_text().split()) if pid_file.exists() else (0, 0)
    if pid and alive(pid):
        log.info("Azurite already runs (pid %d, port %d)", pid, port)
    else:
        port = int(os.environ.get("AZURITE_PORT") or free_port())
        state.mkdir(exist_ok=True)
        proc = start_azurite(exe, port, state / "data", state / "azurite.log")
        pid_file.write_text(f"{proc.pid} {port}\n")
        log.info("Azurite listens on http://127.0.0.1:%d (pid %d, data in %s/data)", port, proc.pid, state)
    conn_str = connection_string(port)
    create_container(conn_str, container)
    # A connection string wins over account_name/account_key, so a team's own settings come back after `down`.
    dvc("remote", "modify", "--local", name, "connection_string", conn_str)
    log.info("remote '%s' (%s) now points at it in .dvc/config.local", name, url)


def down(state: Path, local_config: Path) -> None:
    """Stop the Azurite that `up` started and drop its connection string from `local_config`."""
    pid_file = state / "azurite.pid"
    if pid_file.exists():
        pid, port = map(int, pid_file.read_text().split())
        if alive(pid):
            stop(pid)
            log.info("stopped Azurite (pid %d, port %d); its data stays in %s/data", pid, port, state)
        pid_file.unlink()
    else:
        log.info("no Azurite started by `up` runs here")
    name, _ = remote_url()
    if local_config.exists() and "connection_string" in local_config.read_text():
        dvc("remote", "modify", "--local", "--unset", name, "connection_string")


async def _probe(client, container: str, prefix: str) -> None:
    async with client:
        pages = client.get_container_client(container).list_blobs(name_starts_with=prefix).by_page()
        async for _page in pages:
            break


class Remote:
    """The DVC remote as DVC itself would reach it (.dvc/config(.local), env or `az login`), for one-request probes."""

    def __init__(self, name: str, url: str):
        from dvc.repo import Repo

        self.name, self.url = name, url
        try:
            with Repo() as repo:
                odb = repo.cloud.get_remote_odb(name, "push")
                self.container, _, self.prefix = odb.path.partition("/")
                made = odb.fs.fs.service_client
        except Exception as exc:  # dvc's own auth errors: no account_name / connection_string anywhere
            raise StageError(f"remote '{name}' ({url}): {exc} (see README: 'Sharing artifacts')") from None
        self.service_url, self.credential = made.url, made.credential
        self.where = f"remote '{name}' ({url} at {made.url.split('?')[0]})"  # never print a SAS token

    def client(self, connect_s: float, read_s: float):
        from azure.storage.blob.aio import BlobServiceClient

        return BlobServiceClient(
            self.service_url, credential=self.credential, retry_total=0, connection_timeout=connect_s,
            read_timeout=read_s,
        )  # fmt: skip

    def count(self, connect_s: float, read_s: float) -> int:
        """Blobs under the remote's prefix (one listing, no retries): what a push has sent so far."""

        async def listing() -> int:
            async with self.client(connect_s, read_s) as client:
                blobs = client.get_container_client(self.container).list_blobs(name_starts_with=self.prefix)
                return sum([1 async for _ in blobs])

        return asyncio.run(listing())


def check(name: str | None = None) -> None:
    """One listing request without retries; any failure becomes one line that says what to fix."""
    from azure.core.exceptions import (
        HttpResponseError,
        ResourceNotFoundError,
        ServiceRequestError,
        ServiceResponseError,
    )

    name, url = remote_url(name)
    if not url.startswith("azure://"):
        return  # not ours to check
    remote = Remote(name, url)
    container, prefix, where = remote.container, remote.prefix, remote.where
    client = remote.client(CONNECT_S, READ_S)
    try:
        asyncio.run(_probe(client, container, prefix))
    except ResourceNotFoundError:
        raise StageError(f"{where}: container '{container}' does not exist; create it first") from None
    except HttpResponseError as exc:  # 403 AuthenticationFailed (Azure) / AuthorizationFailure (Azurite), 401
        code = getattr(exc.error_code, "value", exc.error_code) or exc.reason
        if exc.status_code in (401, 403):
            raise StageError(f"{where}: credentials rejected ({code}); check the key in .dvc/config.local") from None
        raise StageError(f"{where}: HTTP {exc.status_code} {code}") from None
    except (ServiceRequestError, ServiceResponseError) as exc:
        causes = _causes(exc)
        if any(isinstance(c, ssl.SSLError) for c in causes):
            reason = "TLS handshake failed (an https URL for an http server? check DefaultEndpointsProtocol/endpoint)"
        elif isinstance(exc, ServiceResponseError) or any(isinstance(c, TimeoutError) for c in causes):
            reason = f"no answer (waited {CONNECT_S} s to connect, {READ_S} s for the reply)"
        else:
            oserr = next((c for c in reversed(causes) if isinstance(c, OSError)), None)  # the root one
            if isinstance(oserr, ConnectionRefusedError):
                reason = "cannot connect (connection refused: nothing listens there)"
            else:
                reason = f"cannot connect ({getattr(oserr, 'strerror', None) or oserr or exc})"
        raise StageError(f"{where}: {reason}") from None
    log.info("%s: reachable, credentials accepted", where)


def cache_files(cache: Path) -> int:
    return sum(1 for p in cache.rglob("*") if p.is_file()) if cache.exists() else 0


def transfer(command: str, args: list[str], cache: Path) -> int:
    """`dvc push|pull args` (after `check`), stopped in one line when the remote goes silent mid-transfer.

    DVC retries a remote that stopped answering for about 4 minutes, then prints a multi-line error per file. Here
    the remote is probed (one listing, no retries) every PROBE_S while DVC runs; after STALL_S without an answer DVC
    is stopped and one line says how many files got across and to run the command again (DVC then sends or fetches
    only what is missing). Returns DVC's exit status, or 1 after a stall."""
    name, url = remote_url(remote_arg(args))
    if not url.startswith("azure://"):  # not ours to watch
        return subprocess.call([sys.executable, "-m", "dvc", command, *args])
    remote = Remote(name, url)

    def progress() -> int:
        """Files across so far: blobs in the remote (push), files in the local cache (pull)."""
        return remote.count(PROBE_CONNECT_S, PROBE_READ_S) if command == "push" else cache_files(cache)

    before = progress()
    sys.stdout.flush()
    # its own session: on a stall only DVC (and anything it started) is stopped; Ctrl+C here is forwarded below
    proc = subprocess.Popen([sys.executable, "-m", "dvc", command, *args], start_new_session=True)
    last_answer, done = time.monotonic(), before
    try:
        while proc.poll() is None:
            try:
                if command == "push":
                    done = remote.count(PROBE_CONNECT_S, PROBE_READ_S)
                else:
                    asyncio.run(_probe(remote.client(PROBE_CONNECT_S, PROBE_READ_S), remote.container, remote.prefix))
                last_answer = time.monotonic()
            except Exception:  # noqa: BLE001 - refused, reset, timed out, 5xx: the remote is not answering
                pass
            if time.monotonic() - last_answer >= STALL_S:
                _stop_group(proc)
                # pull: counted now, exact; push: the last listing the remote answered, a lower bound
                moved = f"at least {done - before} files were sent" if command == "push" else (
                    f"{cache_files(cache) - before} files were received")  # fmt: skip
                raise StageError(
                    f"{remote.where}: no answer for {STALL_S} s during `dvc {command}`, stopped it after {moved}; "
                    f"run `make {command}` again (it {'sends' if command == 'push' else 'fetches'} only what is "
                    "missing)"
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=PROBE_S)
    finally:
        if proc.poll() is None:  # Ctrl+C or SIGTERM reached us: DVC, in its own session, did not see it
            _stop_group(proc, signal.SIGINT)
    return proc.returncode


def _stop_group(proc: subprocess.Popen, first: int = signal.SIGTERM) -> None:
    for sig, wait_s in ((first, 5), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _causes(exc: BaseException) -> list[BaseException]:
    chain = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def remote_arg(args: list[str]) -> str | None:
    for flag in ("-r", "--remote"):
        if flag in args[:-1]:
            return args[args.index(flag) + 1]
    return next((a.split("=", 1)[1] for a in args if a.startswith("--remote=")), None)
