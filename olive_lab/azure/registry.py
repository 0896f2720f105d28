"""Register an ORT GenAI model folder (model/ + one .onnx_adapter per task) as an Azure ML model asset.

The upload stage writes models/upload/model.yml (loadable by `azure.ai.ml.load_model` and `az ml model create --file`) and
models/upload/receipt.json. With no workspace configured (params upload.subscription_id / resource_group / workspace,
or env AZURE_SUBSCRIPTION_ID / AZURE_RESOURCE_GROUP / AZUREML_WORKSPACE) nothing is sent: the receipt says why, so
`dvc repro` stays green offline. The version defaults to one derived from the folder's content, and a content already
registered under the name is never registered again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from olive_lab.errors import StageError
from olive_lab.files import atomic_dir, write_json
from olive_lab.params import require

log = logging.getLogger(__name__)

PARAMS_FILE = "params.yaml"  # named in messages about upload.* keys

# Azure ML's own rule for asset names (letters, digits, '-', '_', '.'; first a letter or digit; up to 255). We also
# refuse a trailing '.', which ARM strips from URL path segments, so the asset would not be found under its name.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
# Workspace model versions must be positive integers (Azure ML rejects "1.0" or hex digests, although the SDK sends
# them); we also keep them within a signed 32-bit int, the narrowest type the service may parse them into.
MAX_VERSION = 2**31 - 1
WORKSPACE_ENV = {
    "subscription_id": "AZURE_SUBSCRIPTION_ID",
    "resource_group": "AZURE_RESOURCE_GROUP",
    "workspace": "AZUREML_WORKSPACE",
}
IMDS_URL = "http://169.254.169.254"
SIGN_IN_ENDPOINT_ENV = (
    "IDENTITY_ENDPOINT",
    "MSI_ENDPOINT",
    "AZURE_AUTHORITY_HOST",
    "AZURE_POD_IDENTITY_AUTHORITY_HOST",
)
ARM_SCOPE = "https://management.azure.com/.default"  # public cloud; sovereign clouds would need their own
READ_TIMEOUT_S = 60  # per HTTP read after the bounded connect phase (uploads are chunked, so this is per chunk)
MAX_METRIC_TAGS = 30
INTERPRETER_START_S = 0.1  # before run() starts: measured ~0.06 s
EXIT_S = 1.5  # interpreter teardown after the error, with azure.ai.ml loaded: measured 0.5-0.8 s on a busy machine
SCHEMA = "https://azuremlschemas.azureedge.net/latest/model.schema.json"


# ---------------------------------------------------------------- what we register


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name.endswith("."):
        raise StageError(
            f"{PARAMS_FILE}: upload.model_name {name!r} is not a valid Azure ML asset name (1-255 letters, digits, "
            "'-', '_' or '.', starting with a letter or digit and not ending with '.')"
        )
    return name


def check_version(version: Any) -> str:
    text = str(version) if isinstance(version, int) and not isinstance(version, bool) else version
    if not isinstance(text, str) or not re.fullmatch(r"[1-9][0-9]{0,9}", text) or int(text) > MAX_VERSION:
        raise StageError(
            f"{PARAMS_FILE}: upload.version {version!r} is not a valid Azure ML model version (a whole number from 1 to "
            f"{MAX_VERSION} without leading zeros), or null to derive it from the model's content"
        )
    return text


def model_files(model_dir: Path) -> tuple[list[Path], list[str]]:
    """The files to register and the adapter names; fails when the folder is not an ORT GenAI model."""
    if not model_dir.is_dir():
        raise StageError(f"{model_dir}: not found (run the optimize stage first: `dvc repro optimize`)")
    config = model_dir / "model" / "genai_config.json"
    if not config.is_file():
        raise StageError(f"{config}: not found ({model_dir} is not an ONNX Runtime GenAI model folder)")
    if not any((model_dir / "model").glob("*.onnx")):
        raise StageError(f"{model_dir / 'model'}: no .onnx file in it")
    adapters = sorted(p.stem for p in (model_dir / "adapters").glob("*.onnx_adapter"))
    if not adapters:
        log.warning("no adapters in %s: registering the base model only", model_dir / "adapters")
    return sorted(p for p in model_dir.rglob("*") if p.is_file()), adapters


def content_hash(model_dir: Path, files: list[Path]) -> str:
    """sha256 over relative paths and bytes: renaming, adding or editing any file changes it, timestamps don't."""
    from tqdm import tqdm

    digest = hashlib.sha256()
    with tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc=f"hashing {model_dir}",
              disable=None, leave=False) as bar:  # fmt: skip
        for f in files:
            digest.update(f.relative_to(model_dir).as_posix().encode() + b"\0")
            digest.update(f"{f.stat().st_size}\0".encode())  # keeps file boundaries unambiguous
            with f.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
                    bar.update(len(chunk))
    return digest.hexdigest()


def version_from_hash(content_sha256: str) -> str:
    """A stable positive integer for the content (a collision needs ~46k versions of one name to reach 50 %)."""
    return str(int(content_sha256, 16) % MAX_VERSION + 1)


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def metric_tags(path: Path) -> dict[str, str]:
    """Numeric leaves of metrics/eval.json as 'eval.<dotted key>' tags; none (and a log line) when it is absent."""
    if not path.exists():
        log.info("%s not found: no metric tags (run the evaluate stage to get them)", path)
        return {}
    try:
        metrics = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StageError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(metrics, dict):
        raise StageError(f"{path}: expected a JSON object at the top level")

    def leaves(node: dict, prefix: str) -> Iterator[tuple[str, float]]:
        for key, value in node.items():
            dotted = f"{prefix}.{re.sub(r'[^A-Za-z0-9._-]', '_', str(key))}"
            if isinstance(value, dict):
                yield from leaves(value, dotted)
            elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                yield dotted, value

    found = list(leaves(metrics, "eval"))
    if len(found) > MAX_METRIC_TAGS:
        log.warning("%s has %d numeric metrics: tagging the first %d", path, len(found), MAX_METRIC_TAGS)
    return {key: f"{value:.6g}" for key, value in found[:MAX_METRIC_TAGS]}


def check_inputs(params: dict[str, Any], model_dir: Path, eval_path: Path) -> dict[str, Any]:
    """Everything that can be wrong locally, checked before any network call; no hashing yet (it can take seconds)."""
    name = check_name(require(params, "upload.model_name"))
    pinned = require(params, "upload.version")
    version = None if pinned is None else check_version(pinned)
    files, adapters = model_files(model_dir)
    return {
        "name": name,
        "version": version,
        "description": require(params, "upload.description"),
        "model_dir": model_dir,
        "files": files,
        "adapters": adapters,
        "metric_tags": metric_tags(eval_path),
        "params_hash": params_hash(params["upload"]),
    }


def params_hash(upload_params: dict[str, Any]) -> str:
    """A short hash of exactly the params the upload stage declares (its `upload` section), so the tag changes
    when they do and only then."""
    return hashlib.sha256(json.dumps(upload_params, sort_keys=True, default=str).encode()).hexdigest()[:12]


def build_model(inputs: dict[str, Any]):
    """The Model entity (type custom_model) with its tags; the version comes from the content unless pinned."""
    from azure.ai.ml.constants import AssetTypes
    from azure.ai.ml.entities import Model

    sha = content_hash(inputs["model_dir"], inputs["files"])
    tags = {
        "git_revision": git_revision(),
        "params_hash": inputs["params_hash"],
        "content_sha256": sha,
        "adapters": ",".join(inputs["adapters"]),
        **inputs["metric_tags"],
    }
    return Model(
        name=inputs["name"],
        version=inputs["version"] or version_from_hash(sha),
        type=AssetTypes.CUSTOM_MODEL,
        path=str(inputs["model_dir"]),
        description=inputs["description"],
        tags=tags,
    )


def model_yaml(model, model_dir: Path, yml_dir: Path) -> str:
    """The asset as YAML. Model.dump writes an absolute path; az and load_model resolve it against the YAML's folder."""
    buffer = io.StringIO()
    model.dump(buffer)
    doc = {"$schema": SCHEMA, **yaml.safe_load(buffer.getvalue())}
    doc["path"] = Path(os.path.relpath(model_dir.resolve(), yml_dir.resolve())).as_posix()
    if not doc.get("properties"):
        doc.pop("properties", None)
    return yaml.safe_dump(doc, sort_keys=False)


# ---------------------------------------------------------------- where it goes


def workspace_config(params: dict[str, Any]) -> dict[str, str] | None:
    """Params first, then env; None when nothing is set; one line naming what is missing when only part is."""
    upload = require(params, "upload")
    found = {key: upload.get(key) or os.environ.get(env) or None for key, env in WORKSPACE_ENV.items()}
    if not any(found.values()):
        return None
    missing = [f"upload.{key} (or env {WORKSPACE_ENV[key]})" for key, value in found.items() if not value]
    if missing:
        raise StageError(f"Azure ML workspace only partly configured: missing {', '.join(missing)}")
    return {key: str(value) for key, value in found.items()}


def call_within(fn: Callable[[], Any], seconds: float, on_timeout: str) -> Any:
    """Run fn in a daemon thread and give up after `seconds`: Azure SDK calls can block for minutes on a silent host,
    and a daemon thread left behind does not keep the process from exiting."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=target, name="upload-deadline", daemon=True)
    worker.start()
    worker.join(max(seconds, 0.1))
    if worker.is_alive():
        raise StageError(on_timeout)
    if "error" in box:
        raise box["error"]
    return box["value"]


def sign_in_timeout(seconds: float) -> str:
    endpoint = next(
        (f"; endpoint from env {e}: {os.environ[e]}" for e in SIGN_IN_ENDPOINT_ENV if os.environ.get(e)), ""
    )
    return (
        f"Azure sign-in got no answer within {seconds:g} s (upload.timeout_s){endpoint}; env "
        "AZURE_TOKEN_CREDENTIALS=AzureCliCredential (or another credential's name) limits sign-in to one method"
    )


def managed_identity_reachable() -> bool:
    """On an Azure VM the metadata endpoint (IMDS) accepts at once. Elsewhere DefaultAzureCredential retries it for
    5-15 s before trying `az login`, so a quick TCP check decides whether managed identity is tried at all."""
    if os.environ.get("IDENTITY_ENDPOINT") or os.environ.get("MSI_ENDPOINT"):
        return True  # App Service, Functions, Arc...: a local endpoint that azure-identity handles itself
    url = urlparse(os.environ.get("AZURE_POD_IDENTITY_AUTHORITY_HOST") or IMDS_URL)
    try:
        with socket.create_connection((url.hostname, url.port or 80), timeout=1):
            return True
    except OSError:
        return False


class BoundedCredential:
    """DefaultAzureCredential with a deadline on every token request (alone it can wait ~300 s on a silent endpoint)."""

    def __init__(self, inner: Any, seconds: float) -> None:
        self.inner, self.seconds = inner, seconds

    def _bounded(self, fn: Callable[[], Any]) -> Any:
        return call_within(fn, self.seconds, sign_in_timeout(self.seconds))

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        return self._bounded(lambda: self.inner.get_token(*scopes, **kwargs))

    def get_token_info(self, *scopes: str, options: Any = None) -> Any:
        return self._bounded(lambda: self.inner.get_token_info(*scopes, options=options))

    def close(self) -> None:
        self.inner.close()


def sign_in_failure(exc: Exception) -> str:
    """DefaultAzureCredential's many-line report as one line: the credential that failed, or how to provide one."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.startswith("\t")]
    unavailable = ("unavailable", "not found", "not installed", "could not be found", "requires the", "not configured")
    failed = [ln for ln in lines if not any(word in ln.lower() for word in unavailable)]
    if failed:
        return f"Azure sign-in failed: {failed[-1]}"
    if not lines:
        return f"Azure sign-in failed: {str(exc).strip().splitlines()[0]}"
    return (
        "Azure sign-in failed: no credential found: run `az login`, or set AZURE_TENANT_ID, AZURE_CLIENT_ID and "
        "AZURE_CLIENT_SECRET (STAGE_DEBUG=1 lists what each sign-in method said)"
    )


def quiet_azure_logs() -> None:
    """The SDK logs each failed sign-in method over many lines; callers report the failure in one."""
    for noisy in ("azure.identity", "azure.ai.ml._utils._experimental"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def open_workspace(ws: dict[str, str], timeout_s: float, deadline: float):
    """Sign in (bounded by the stage's deadline) and return an MLClient whose HTTP calls have timeouts and few retries."""
    from azure.ai.ml import MLClient
    from azure.core.exceptions import ClientAuthenticationError
    from azure.identity import DefaultAzureCredential

    use_managed_identity = managed_identity_reachable()
    log.info("signing in to Azure%s", "" if use_managed_identity else " (no managed identity endpoint here)")
    try:
        inner = DefaultAzureCredential(
            process_timeout=max(1, int(timeout_s)),  # az / azd / pwsh subprocesses
            exclude_managed_identity_credential=not use_managed_identity,
            exclude_interactive_browser_credential=True,  # a pipeline stage must never wait for a browser
            exclude_broker_credential=True,
        )
    except ValueError as exc:  # e.g. AZURE_CLIENT_CERTIFICATE_PATH names a file that is not a certificate
        raise StageError(f"Azure credential settings in env are not usable: {exc}") from exc
    try:
        call_within(lambda: inner.get_token(ARM_SCOPE), deadline - time.monotonic(), sign_in_timeout(timeout_s))
    except ClientAuthenticationError as exc:
        raise StageError(sign_in_failure(exc)) from exc
    return MLClient(
        BoundedCredential(inner, timeout_s),
        ws["subscription_id"],
        ws["resource_group"],
        ws["workspace"],
        enable_telemetry=False,  # telemetry would be network traffic nobody asked for
        connection_timeout=timeout_s,
        read_timeout=max(READ_TIMEOUT_S, timeout_s),
        retry_total=3,
        retry_connect=1,
        retry_backoff_max=10,
    )


@contextmanager
def azure_errors(step: str) -> Iterator[None]:
    """Azure SDK errors as one line naming the step."""
    from azure.ai.ml.exceptions import MlException
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ServiceRequestError

    try:
        yield
    except MlException as exc:  # the SDK's own checks (empty folder, path already used by another version...)
        raise StageError(f"{step}: {first_line(exc.message or str(exc))}") from exc
    except ClientAuthenticationError as exc:
        raise StageError(f"{step}: {sign_in_failure(exc)}") from exc
    except HttpResponseError as exc:
        raise StageError(f"{step}: HTTP {exc.status_code}: {first_line(exc.message or str(exc))}") from exc
    except ServiceRequestError as exc:
        raise StageError(f"{step}: cannot reach Azure ML: {first_line(str(exc))}") from exc


def first_line(text: str) -> str:
    """The SDK's messages run over several lines (request ids, docs links): the first one says what happened."""
    lines = str(text).strip().splitlines()
    return lines[0].strip() if lines else "(no message)"


def registered_versions(client, name: str) -> dict[str, Any]:
    """version -> Model for each registered version of `name`, archived ones included."""
    from azure.ai.ml.constants import ListViewType
    from azure.core.exceptions import ResourceNotFoundError

    try:
        return {m.version: m for m in client.models.list(name=name, list_view_type=ListViewType.ALL)}
    except ResourceNotFoundError:  # no model of that name yet
        return {}


def where(ws: dict[str, str]) -> str:
    return f"workspace {ws['workspace']} (resource group {ws['resource_group']}, subscription {ws['subscription_id']})"


def look_up(client, ws: dict[str, str], name: str, deadline: float, timeout_s: float) -> dict[str, Any]:
    """Check the workspace exists and list the versions of `name`, within the stage's deadline."""

    def calls() -> dict[str, Any]:
        client.workspaces.get(ws["workspace"])  # its own clear 404 before the model calls
        return registered_versions(client, name)

    with azure_errors(f"Azure ML {where(ws)}"):
        msg = f"Azure ML {where(ws)}: no answer within {timeout_s:g} s (upload.timeout_s)"
        return call_within(calls, deadline - time.monotonic(), msg)


def register(client, model, ws: dict[str, str], versions: dict[str, Any]) -> dict[str, Any]:
    """Register unless this content is already there (then `model.version` becomes that version).

    Returns the receipt's Azure part.
    """
    sha = model.tags["content_sha256"]
    same = [m for m in versions.values() if (m.tags or {}).get("content_sha256") == sha]
    if same:
        log.info("this content is already registered as %s:%s: not registering it again", model.name, same[0].version)
        model.version = same[0].version
        return {"uploaded": False, "registered": True, "asset_id": same[0].id,
                "reason": "this content is already registered under this name"}  # fmt: skip
    if model.version in versions:
        raise StageError(
            f"Azure ML model {model.name} version {model.version} already exists with other content: set "
            "upload.version to an unused version, or to null to derive it from the content"
        )
    log.info("registering %s as %s:%s in %s", model.path, model.name, model.version, where(ws))
    with azure_errors(f"registering {model.name}:{model.version}"):
        created = client.models.create_or_update(model)
    log.info("registered %s", created.id)
    return {"uploaded": True, "registered": True, "asset_id": created.id}


# ---------------------------------------------------------------- all of it


def upload(params: dict[str, Any], model_dir: Path, eval_path: Path, out: Path, started: float) -> dict[str, Any]:
    """Check, sign in, look up, register (when a workspace is configured), then write `out`/model.yml and
    `out`/receipt.json atomically. `started`: monotonic time the process started; everything before the upload
    itself (imports, sign-in, reaching the workspace) ends within upload.timeout_s of it."""
    quiet_azure_logs()
    timeout_s = require(params, "upload.timeout_s")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or not 3 <= timeout_s <= 600:
        raise StageError(
            f"{PARAMS_FILE}: upload.timeout_s must be a number of seconds from 3 to 600, not {timeout_s!r}"
        )
    deadline = started + timeout_s - EXIT_S
    ws = workspace_config(params)
    inputs = check_inputs(params, model_dir, eval_path)
    client, versions = None, {}
    if ws is not None:
        client = open_workspace(ws, timeout_s, deadline)
        versions = look_up(client, ws, inputs["name"], deadline, timeout_s)
    model = build_model(inputs)  # hashing can take seconds on a big model: after the bounded part
    receipt: dict[str, Any] = {"name": model.name, "version": model.version, "uploaded": False, "registered": False}
    if client is None:
        receipt["reason"] = (
            "no Azure ML workspace configured: set upload.subscription_id, upload.resource_group and upload.workspace "
            "(conf/upload/) or env AZURE_SUBSCRIPTION_ID, AZURE_RESOURCE_GROUP, AZUREML_WORKSPACE"
        )
        receipt["register_later"] = f"az ml model create --file {out / 'model.yml'} -g <resource group> -w <workspace>"
        log.warning("no Azure ML workspace configured: not uploading (see %s)", out / "receipt.json")
    else:
        receipt.update(workspace=ws, **register(client, model, ws, versions))
        receipt["version"] = model.version
    receipt.update(version_from="params" if inputs["version"] else "content", tags=model.tags,
                   model_dir=str(model_dir), model_yml=str(out / "model.yml"))  # fmt: skip
    with atomic_dir(out) as tmp:
        (tmp / "model.yml").write_text(model_yaml(model, model_dir, out))
        write_json(tmp / "receipt.json", receipt)
    log.info(
        "wrote %s: %s:%s, %s", out, model.name, model.version, "uploaded" if receipt["uploaded"] else "not uploaded"
    )
    return receipt
