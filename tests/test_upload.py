"""Stage upload: the asset YAML, the payload the SDK builds, versions from content, bounded sign-in failures.

Azure ML has no emulator, so the only fake is an autospec'd MLClient. Everything else is real: azure.ai.ml's loader,
DefaultAzureCredential against loopback sockets, the stage as a subprocess. A guard refuses any non-loopback
connection (in-process and in the subprocesses) so no test can reach the internet by accident.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest.mock import create_autospec

import pytest
import yaml

from olive_lab.azure import registry
from stages import upload

ROOT = Path(__file__).resolve().parents[1]
WORKSPACE = {"AZURE_SUBSCRIPTION_ID": "00000000-0000-0000-0000-000000000000", "AZURE_RESOURCE_GROUP": "rg-test",
             "AZUREML_WORKSPACE": "ws-test"}  # fmt: skip
# Everything that points azure-identity or the stage at a real account or endpoint.
AZURE_ENV = [*WORKSPACE, "AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET", "AZURE_CLIENT_CERTIFICATE_PATH",
             "AZURE_CLIENT_CERTIFICATE_PASSWORD", "AZURE_USERNAME", "AZURE_PASSWORD", "AZURE_FEDERATED_TOKEN_FILE",
             "AZURE_AUTHORITY_HOST", "AZURE_TOKEN_CREDENTIALS", "AZURE_POD_IDENTITY_AUTHORITY_HOST",
             "IDENTITY_ENDPOINT", "IDENTITY_HEADER", "IDENTITY_SERVER_THUMBPRINT", "IMDS_ENDPOINT", "MSI_ENDPOINT",
             "MSI_SECRET", "AZURE_CONFIG_DIR", "AZUREML_CURRENT_CLOUD"]  # fmt: skip
LIVE_ENV = {k: os.environ.get(k) for k in AZURE_ENV}  # read before any fixture scrubs the environment
# Fail-fast bounds are upload.timeout_s plus this: starting Python and importing azure.ai.ml take 1-3 s on a quiet
# host and several times that on a busy 2-core one. What they guard against takes 85-300 s (a silent endpoint).
BUSY_HOST_S = 10

GUARD = """
import socket

def make_guard(connect, connect_ex, getaddrinfo):
    def check(host):
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"test network guard: refused to reach {host!r}")

    def guarded_connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            check(address[0])
        return connect(self, address)

    def guarded_connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            check(address[0])
        return connect_ex(self, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        check(host.decode() if isinstance(host, bytes) else host)
        return getaddrinfo(host, *args, **kwargs)

    return guarded_connect, guarded_connect_ex, guarded_getaddrinfo
"""
# Loaded by every subprocess the tests start (PYTHONPATH), so the stage itself runs guarded too.
SITECUSTOMIZE = (
    GUARD
    + """
socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = make_guard(
    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo
)
"""
)


@pytest.fixture(autouse=True)
def no_network(request, monkeypatch):
    """Only loopback connections and lookups, except in the live test."""
    if request.node.name.startswith("test_live"):
        return
    scope: dict = {}
    exec(GUARD, scope)
    connect, connect_ex, getaddrinfo = scope["make_guard"](
        socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo
    )
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def closed_port() -> int:
    """A loopback port nothing listens on: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def silent_port():
    """A loopback port that accepts connections (kernel backlog) and never answers: a hung endpoint."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield server.getsockname()[1]


def fake_model_dir(root: Path, seed: str = "a") -> Path:
    model_dir = root / "models" / "onnx"
    (model_dir / "model").mkdir(parents=True)
    (model_dir / "adapters").mkdir()
    (model_dir / "model" / "genai_config.json").write_text(json.dumps({"model": {"type": "llama"}}))
    (model_dir / "model" / "model.onnx").write_bytes(b"onnx-graph-" + seed.encode())
    (model_dir / "model" / "model.onnx.data").write_bytes(bytes(range(256)) * 64)
    for task in ("travel", "trip_json"):
        (model_dir / "adapters" / f"{task}.onnx_adapter").write_bytes(f"lora-{task}-{seed}".encode())
    return model_dir


def write_params(root: Path, **upload_overrides) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["upload"].update(upload_overrides)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture()
def stage_dir(tmp_path, monkeypatch) -> Path:
    """A tmp working directory with a fake models/onnx, metrics/eval.json and params.yaml; Azure env scrubbed."""
    for key in AZURE_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.azure token caches of whoever runs the tests
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", f"http://127.0.0.1:{closed_port()}")  # IMDS: refused
    fake_model_dir(tmp_path)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "eval.json").write_text(
        json.dumps(
            {
                "travel": {"eval_loss": 1.2345678, "perplexity": 3.4},
                "trip_json": {"json_valid": 0.9},
                "ttft_ms": 41.5,
                "note": "text is not tagged",
                "ok": True,
            }
        )  # fmt: skip
    )
    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_stage(capsys) -> tuple[int, str]:
    """The stage in-process: (exit code, stderr)."""
    try:
        upload.run([])
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def receipt(root: Path) -> dict:
    return json.loads((root / "models" / "upload" / "receipt.json").read_text())


def fake_client(registered: list | None = None):
    """MLClient autospec'd from the real class; its operations autospec'd too, so a wrong call signature fails."""
    from azure.ai.ml import MLClient
    from azure.ai.ml.entities import Model
    from azure.ai.ml.operations import ModelOperations, WorkspaceOperations

    client = create_autospec(MLClient, instance=True)
    client.models = create_autospec(ModelOperations, instance=True)
    client.workspaces = create_autospec(WorkspaceOperations, instance=True)
    client.models.list.return_value = registered or []

    def created(model):
        asset_id = f"azureml://locations/westeurope/workspaces/x/models/{model.name}/versions/{model.version}"
        return Model(name=model.name, version=model.version, id=asset_id, tags=model.tags, type=model.type)

    client.models.create_or_update.side_effect = created
    return client


# ---------------------------------------------------------------- offline: dry run and the YAML


def test_dry_run_writes_yaml_that_load_model_reads_back(stage_dir, capsys):
    from azure.ai.ml import load_model

    code, err = run_stage(capsys)
    assert code == 0, err
    got = receipt(stage_dir)
    assert got["uploaded"] is False and got["registered"] is False
    assert "no Azure ML workspace configured" in got["reason"]

    yml = stage_dir / "models" / "upload" / "model.yml"
    doc = yaml.safe_load(yml.read_text())
    assert doc["path"] == "../onnx"  # relative to the YAML, as az ml model create --file resolves it
    model = load_model(yml)
    assert model.name == "olive-lab-onnx"
    assert model.version == got["version"] and model.version.isdigit()
    assert model.type == "custom_model"
    assert Path(model.path).resolve() == (stage_dir / "models" / "onnx").resolve()
    assert model.tags == got["tags"]
    assert model.tags["adapters"] == "travel,trip_json"
    assert model.tags["git_revision"] == "unknown"  # tmp dir is not a git checkout
    assert len(model.tags["params_hash"]) == 12
    assert model.tags["eval.travel.eval_loss"] == "1.23457"
    assert model.tags["eval.trip_json.json_valid"] == "0.9"
    assert model.tags["eval.ttft_ms"] == "41.5"
    assert not any(k in model.tags for k in ("eval.note", "eval.ok"))


def test_yaml_is_loadable_from_another_working_directory(stage_dir, capsys, monkeypatch):
    """az runs from anywhere: the path must resolve against the YAML's folder, not the cwd."""
    from azure.ai.ml import load_model

    assert run_stage(capsys)[0] == 0
    monkeypatch.chdir(stage_dir / "models")
    model = load_model("upload/model.yml")
    assert Path(model.path).resolve() == (stage_dir / "models" / "onnx").resolve()


def test_git_revision_is_tagged_inside_a_checkout(stage_dir, capsys):
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert run_stage(capsys)[0] == 0
    assert receipt(stage_dir)["tags"]["git_revision"] == head


def test_without_eval_metrics_no_metric_tags_and_a_log_line(stage_dir, capsys, caplog):
    (stage_dir / "metrics" / "eval.json").unlink()
    with caplog.at_level("INFO", logger="olive_lab.azure.registry"):
        assert run_stage(capsys)[0] == 0
    assert not any(k.startswith("eval.") for k in receipt(stage_dir)["tags"])
    assert "metrics/eval.json not found" in caplog.text


def test_same_content_same_version_changed_content_new_version(stage_dir, capsys, tmp_path_factory, monkeypatch):
    assert run_stage(capsys)[0] == 0
    first = receipt(stage_dir)["version"]
    assert run_stage(capsys)[0] == 0
    assert receipt(stage_dir)["version"] == first

    # Same bytes elsewhere (other mtimes, other absolute path): same version.
    other = tmp_path_factory.mktemp("other")
    fake_model_dir(other)
    (other / "params.yaml").write_text((stage_dir / "params.yaml").read_text())
    monkeypatch.chdir(other)
    assert run_stage(capsys)[0] == 0
    assert receipt(other)["version"] == first

    # One byte of one adapter changed: another version. A renamed file too.
    adapter = other / "models" / "onnx" / "adapters" / "travel.onnx_adapter"
    adapter.write_bytes(adapter.read_bytes()[:-1] + b"!")
    assert run_stage(capsys)[0] == 0
    changed = receipt(other)["version"]
    assert changed != first
    adapter.rename(adapter.with_name("travel2.onnx_adapter"))
    assert run_stage(capsys)[0] == 0
    assert receipt(other)["version"] not in (first, changed)


def test_pinned_version_is_used(stage_dir, capsys):
    write_params(stage_dir, version=7, model_name="Travel_Model.v2")
    assert run_stage(capsys)[0] == 0
    got = receipt(stage_dir)
    assert (got["name"], got["version"], got["version_from"]) == ("Travel_Model.v2", "7", "params")


@pytest.mark.parametrize("name", ["-lead-dash", "_lead", "has space", "a/b", "x" * 256, "ends.", "naïve", "", 42])
def test_invalid_model_name_fails_in_one_line(stage_dir, capsys, name):
    write_params(stage_dir, model_name=name)
    code, err = run_stage(capsys)
    assert code == 1
    assert err.count("\n") == 1 and "upload.model_name" in err
    assert not (stage_dir / "models" / "upload").exists()


@pytest.mark.parametrize("version", ["1.0", "abc", "0", "-1", "01", "2147483648", "1e3", 1.5, True, ""])
def test_invalid_version_fails_in_one_line(stage_dir, capsys, version):
    write_params(stage_dir, version=version)
    code, err = run_stage(capsys)
    assert code == 1
    assert err.count("\n") == 1 and "upload.version" in err


def test_name_at_the_length_limit_is_accepted():
    assert registry.check_name("a" * 255) == "a" * 255
    assert registry.check_version("2147483647") == "2147483647"


def test_missing_model_folder_fails_in_one_line(stage_dir, capsys):
    (stage_dir / "models" / "onnx" / "model" / "genai_config.json").unlink()
    code, err = run_stage(capsys)
    assert code == 1 and "models/onnx/model/genai_config.json: not found" in err


def test_broken_eval_metrics_fail_in_one_line(stage_dir, capsys):
    (stage_dir / "metrics" / "eval.json").write_text("{not json")
    code, err = run_stage(capsys)
    assert code == 1 and "metrics/eval.json: not valid JSON" in err and err.count("\n") == 1


@pytest.mark.parametrize("only", ["AZURE_SUBSCRIPTION_ID", "AZUREML_WORKSPACE"])
def test_partly_configured_workspace_names_what_is_missing(stage_dir, capsys, monkeypatch, only):
    monkeypatch.setenv(only, WORKSPACE[only])
    code, err = run_stage(capsys)
    assert code == 1 and err.count("\n") == 1
    missing = [k for k in WORKSPACE if k != only]
    assert all(k in err for k in missing) and only not in err


def test_partly_configured_from_params(stage_dir, capsys):
    write_params(stage_dir, subscription_id="abc", workspace="ws")
    code, err = run_stage(capsys)
    assert code == 1 and "upload.resource_group" in err and "upload.workspace" not in err


# ---------------------------------------------------------------- configured: what the SDK is asked to send


@pytest.fixture()
def configured(stage_dir, monkeypatch):
    for key, value in WORKSPACE.items():
        monkeypatch.setenv(key, value)
    client = fake_client()
    opened = []
    monkeypatch.setattr(registry, "open_workspace", lambda ws, timeout_s, deadline: opened.append(ws) or client)
    client.opened = opened
    return client


def test_rest_payload_has_name_version_type_tags(configured, stage_dir, capsys):
    code, err = run_stage(capsys)
    assert code == 0, err
    assert configured.opened == [{"subscription_id": WORKSPACE["AZURE_SUBSCRIPTION_ID"], "resource_group": "rg-test",
                                  "workspace": "ws-test"}]  # fmt: skip
    configured.workspaces.get.assert_called_once_with("ws-test")
    (model,), _ = configured.models.create_or_update.call_args
    got = receipt(stage_dir)

    arm = model._to_arm_resource_param()["model_version"]  # name/version go in the PUT's URL, the rest in its body
    assert (arm["name"], arm["version"]) == ("olive-lab-onnx", got["version"])
    body = model._to_rest_object().properties
    assert body.model_type == "custom_model"
    assert body.tags == got["tags"]
    assert set(body.tags) >= {"git_revision", "params_hash", "content_sha256", "adapters", "eval.ttft_ms"}
    assert Path(body.model_uri).resolve() == (stage_dir / "models" / "onnx").resolve()
    assert body.description == yaml.safe_load((stage_dir / "params.yaml").read_text())["upload"]["description"]

    assert got["uploaded"] is True and got["registered"] is True
    assert got["asset_id"].endswith(f"/models/olive-lab-onnx/versions/{got['version']}")
    assert got["workspace"]["workspace"] == "ws-test"


def test_params_workspace_wins_over_env(configured, stage_dir, capsys):
    write_params(stage_dir, subscription_id="sub-from-params", resource_group="rg-params", workspace="ws-params")
    assert run_stage(capsys)[0] == 0
    assert configured.opened == [{"subscription_id": "sub-from-params", "resource_group": "rg-params",
                                  "workspace": "ws-params"}]  # fmt: skip


def test_content_already_registered_is_not_registered_again(configured, stage_dir, capsys):
    from azure.ai.ml.entities import Model

    assert run_stage(capsys)[0] == 0
    sha = receipt(stage_dir)["tags"]["content_sha256"]
    write_params(stage_dir, version=99)  # even under a pinned other version: one content, one version
    configured.models.create_or_update.reset_mock()
    configured.models.list.return_value = [
        Model(name="olive-lab-onnx", version="3", id="azureml:.../versions/3", tags={"content_sha256": sha})
    ]
    code, err = run_stage(capsys)
    assert code == 0, err
    configured.models.create_or_update.assert_not_called()
    got = receipt(stage_dir)
    assert (got["version"], got["uploaded"], got["registered"]) == ("3", False, True)
    assert yaml.safe_load((stage_dir / "models" / "upload" / "model.yml").read_text())["version"] == "3"


def test_version_taken_by_other_content_fails_in_one_line(configured, stage_dir, capsys):
    from azure.ai.ml.entities import Model

    write_params(stage_dir, version=5)
    configured.models.list.return_value = [Model(name="olive-lab-onnx", version="5", tags={"content_sha256": "0" * 64})]
    code, err = run_stage(capsys)
    assert code == 1 and "version 5 already exists with other content" in err and err.count("\n") == 1
    configured.models.create_or_update.assert_not_called()


def test_service_error_is_one_line(configured, stage_dir, capsys):
    from azure.core.exceptions import ResourceNotFoundError

    configured.workspaces.get.side_effect = ResourceNotFoundError("The Resource 'ws-test' was not found.\nmore")
    code, err = run_stage(capsys)
    assert code == 1 and err.count("\n") == 1
    assert "ws-test" in err and "not found" in err
    assert not (stage_dir / "models" / "upload").exists()


def test_managed_identity_is_tried_only_where_its_endpoint_answers(stage_dir, silent_port, monkeypatch):
    """Off Azure, DefaultAzureCredential retries IMDS for 5-15 s before `az login`: skipped when nothing listens."""
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", f"http://127.0.0.1:{closed_port()}")
    assert registry.managed_identity_reachable() is False
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", f"http://127.0.0.1:{silent_port}")
    assert registry.managed_identity_reachable() is True
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("IDENTITY_ENDPOINT", "http://127.0.0.1:1/msi/token")  # App Service: azure-identity's call
    assert registry.managed_identity_reachable() is True


def test_silent_workspace_fails_clearly_within_the_bound(configured, stage_dir, capsys):
    """Signed in, but Azure ML never answers: the workspace look-up shares the stage's deadline."""
    release = threading.Event()
    configured.workspaces.get.side_effect = lambda name: release.wait(60)
    write_params(stage_dir, timeout_s=3)
    start = time.monotonic()
    try:
        code, err = run_stage(capsys)
    finally:
        release.set()
    assert code == 1 and err.count("\n") == 1
    assert "workspace ws-test" in err and "no answer within 3 s" in err
    assert time.monotonic() - start < 3 + BUSY_HOST_S
    configured.models.create_or_update.assert_not_called()


@pytest.mark.parametrize("timeout_s", [0, 2, 601, "ten", True, None])
def test_invalid_timeout_fails_in_one_line(stage_dir, capsys, timeout_s):
    write_params(stage_dir, timeout_s=timeout_s)
    code, err = run_stage(capsys)
    assert code == 1 and "upload.timeout_s" in err and err.count("\n") == 1


# ---------------------------------------------------------------- sign-in failures, bounded in time (subprocess)


def stage_subprocess(root: Path, env: dict[str, str]) -> tuple[int, str, float]:
    guard = root / "guard"
    guard.mkdir(exist_ok=True)
    (guard / "sitecustomize.py").write_text(SITECUSTOMIZE)
    base = {k: v for k, v in os.environ.items() if k not in AZURE_ENV}
    full = {**base, "PYTHONPATH": f"{ROOT}{os.pathsep}{guard}", "HOME": str(root / "home"), **WORKSPACE, **env}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "stages.upload"], cwd=root, env=full, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    return proc.returncode, proc.stderr, time.monotonic() - start


def one_error_line(stderr: str) -> bool:
    """Log lines may come before it, but there is exactly one error line and no traceback."""
    errors = [ln for ln in stderr.splitlines() if "error" in ln.lower() or "Traceback" in ln]
    return len(errors) == 1 and errors[0].startswith("upload: error: ")


def test_missing_credentials_fail_clearly_and_fast(stage_dir):
    write_params(stage_dir, timeout_s=8)
    imds = f"http://127.0.0.1:{closed_port()}"
    code, err, elapsed = stage_subprocess(stage_dir, {"AZURE_POD_IDENTITY_AUTHORITY_HOST": imds})
    assert code == 1, err
    assert one_error_line(err)
    assert "no credential found" in err and "az login" in err
    assert elapsed < 8 + BUSY_HOST_S, f"took {elapsed:.1f} s"
    assert not (stage_dir / "models" / "upload").exists()


@pytest.mark.parametrize("flavour", ["app_service", "cloud_shell", "imds"])
def test_silent_sign_in_endpoint_fails_clearly_within_the_bound(stage_dir, silent_port, flavour):
    """Managed identity endpoints that accept and never answer. (Not AZURE_AUTHORITY_HOST: MSAL then falls back to
    instance discovery at login.microsoftonline.com, real traffic that only the guard would stop.)"""
    write_params(stage_dir, timeout_s=6)
    silent = f"http://127.0.0.1:{silent_port}"
    env = {
        "app_service": {"IDENTITY_ENDPOINT": f"{silent}/msi/token", "IDENTITY_HEADER": "x",
                        "AZURE_POD_IDENTITY_AUTHORITY_HOST": f"http://127.0.0.1:{closed_port()}"},
        "cloud_shell": {"MSI_ENDPOINT": f"{silent}/oauth2/token",
                        "AZURE_POD_IDENTITY_AUTHORITY_HOST": f"http://127.0.0.1:{closed_port()}"},
        "imds": {"AZURE_POD_IDENTITY_AUTHORITY_HOST": silent},  # an Azure VM whose metadata service hangs
    }[flavour]  # fmt: skip
    code, err, elapsed = stage_subprocess(stage_dir, env)
    assert code == 1, err
    assert one_error_line(err), err
    assert "got no answer within 6 s" in err and f"127.0.0.1:{silent_port}" in err
    assert elapsed < 6 + BUSY_HOST_S, f"took {elapsed:.1f} s"


def test_unreadable_client_certificate_fails_in_one_line(stage_dir):
    """Wrong credentials we can produce offline: a service principal certificate that is not a certificate."""
    (stage_dir / "cert.pem").write_text("not a certificate")
    env = {"AZURE_TENANT_ID": "00000000-0000-0000-0000-000000000001", "AZURE_CLIENT_ID": "app",
           "AZURE_CLIENT_CERTIFICATE_PATH": str(stage_dir / "cert.pem"),
           "AZURE_POD_IDENTITY_AUTHORITY_HOST": f"http://127.0.0.1:{closed_port()}"}  # fmt: skip
    code, err, elapsed = stage_subprocess(stage_dir, env)
    assert code == 1 and one_error_line(err), err
    assert "credential settings in env are not usable" in err and "certificate" in err
    assert elapsed < 10 + BUSY_HOST_S, f"took {elapsed:.1f} s"  # params.yaml's upload.timeout_s: 10


# ---------------------------------------------------------------- live, only with a real workspace


def live_ready() -> bool:
    workspace = all(LIVE_ENV[k] for k in WORKSPACE)
    service_principal = all(LIVE_ENV[k] for k in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"))
    return workspace and (service_principal or os.environ.get("UPLOAD_LIVE_TEST") == "1")


@pytest.mark.slow
@pytest.mark.skipif(not live_ready(), reason="needs AZURE_SUBSCRIPTION_ID, AZURE_RESOURCE_GROUP, AZUREML_WORKSPACE and "
                    "a service principal in env (or UPLOAD_LIVE_TEST=1 after `az login`)")  # fmt: skip
def test_live_register_and_read_back(tmp_path, monkeypatch, capsys):
    from azure.ai.ml import MLClient
    from azure.identity import DefaultAzureCredential

    fake_model_dir(tmp_path, seed=os.urandom(8).hex())  # new content: a new version each run
    write_params(tmp_path, model_name="olive-lab-upload-test", timeout_s=30)
    monkeypatch.chdir(tmp_path)
    code, err = run_stage(capsys)
    assert code == 0, err
    got = receipt(tmp_path)
    assert got["uploaded"] is True
    client = MLClient(DefaultAzureCredential(), *(LIVE_ENV[k] for k in WORKSPACE), enable_telemetry=False)
    try:
        model = client.models.get("olive-lab-upload-test", got["version"])
        assert model.type == "custom_model"
        assert model.tags["content_sha256"] == got["tags"]["content_sha256"]
        assert model.tags["adapters"] == "travel,trip_json"
        # Second run: same content, nothing registered again.
        code, err = run_stage(capsys)
        assert code == 0, err
        assert receipt(tmp_path)["uploaded"] is False and receipt(tmp_path)["version"] == got["version"]
    finally:
        client.models.archive("olive-lab-upload-test", got["version"])


# ---------------------------------------------------------------- the tag, a new name, a failing register, MLClient


def leaves(node, prefix: str = ""):
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from leaves(value, dotted + ".")
        else:
            yield dotted


def test_params_hash_covers_exactly_the_params_dvc_yaml_declares(stage_dir):
    """The tag changes with every param the stage declares in dvc.yaml and with no other: a param outside them
    would make the tag stale (DVC would not re-run upload when it changes), one inside that is not hashed too."""
    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["upload"]["params"]
    params = yaml.safe_load((stage_dir / "params.yaml").read_text())
    model_dir, eval_path = stage_dir / "models" / "onnx", stage_dir / "metrics" / "eval.json"

    def tag(p: dict) -> str:
        return registry.check_inputs(p, model_dir, eval_path)["params_hash"]

    before = tag(params)
    keys = list(leaves(params))
    assert any(k.startswith("upload.") for k in keys) and len(keys) > 30
    for dotted in keys:
        changed = yaml.safe_load(yaml.safe_dump(params))
        node = changed
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        # a different value that every upload check still accepts
        node[last] = "olive-lab-other" if dotted == "upload.model_name" else 42 if dotted == "upload.version" else (
            f"{node[last]}-changed" if isinstance(node[last], str) else [node[last], "changed"])  # fmt: skip
        if dotted == "upload.timeout_s":
            node[last] = 11
        is_declared = any(dotted == d or dotted.startswith(f"{d}.") for d in declared)
        assert (tag(changed) != before) == is_declared, dotted


def test_first_upload_of_a_new_model_name(configured, stage_dir, capsys):
    """Azure ML answers 404 to listing the versions of a name it has never seen: that is 'no versions yet'."""
    from azure.core.exceptions import ResourceNotFoundError
    from azure.core.paging import ItemPaged

    def no_such_model(continuation_token=None):
        raise ResourceNotFoundError("Not found: model olive-lab-onnx\nRequest id ...")

    configured.models.list.return_value = ItemPaged(no_such_model, lambda page: (None, iter(page)))
    code, err = run_stage(capsys)
    assert code == 0, err
    configured.models.list.assert_called_once()
    configured.models.create_or_update.assert_called_once()
    got = receipt(stage_dir)
    assert (got["uploaded"], got["registered"], got["version_from"]) == (True, True, "content")
    (model,), _ = configured.models.create_or_update.call_args
    assert model.version == got["version"] == registry.version_from_hash(got["tags"]["content_sha256"])


def http_error(status: int, message: str):
    from azure.core.exceptions import HttpResponseError

    exc = HttpResponseError(message=message)
    exc.status_code = status
    return exc


@pytest.mark.parametrize(
    "error, says",
    [
        (lambda: http_error(403, "AuthorizationFailed: the client 'x' has no write permission\nCode: 403"),
         "HTTP 403: AuthorizationFailed: the client 'x' has no write permission"),
        (lambda: __import__("azure.core.exceptions", fromlist=["x"]).ServiceRequestError("Connection reset\nmore"),
         "cannot reach Azure ML: Connection reset"),
        (lambda: __import__("azure.ai.ml.exceptions", fromlist=["x"]).ValidationException(
            message="The path models/onnx is already used by another version\nmore", no_personal_data_message="x"),
         "The path models/onnx is already used by another version"),
    ],
    ids=["http", "network", "sdk"],
)  # fmt: skip
def test_failing_create_or_update_is_one_line_and_writes_nothing(configured, stage_dir, capsys, error, says):
    configured.models.create_or_update.side_effect = error()
    code, err = run_stage(capsys)
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("upload: error: registering olive-lab-onnx:") and says in err, err
    assert not (stage_dir / "models" / "upload").exists()


def test_mlclient_is_built_with_the_bounded_credential_and_timeouts(stage_dir, monkeypatch):
    """open_workspace builds the real MLClient (nothing sent: its first call is the caller's)."""
    import azure.identity
    from azure.ai.ml import MLClient
    from azure.core.credentials import AccessToken

    made = []
    hang = threading.Event()

    class Credential:  # stands in for DefaultAzureCredential, the one part that would talk to Azure
        def __init__(self, **kwargs):
            self.kwargs = kwargs
            made.append(self)

        def get_token(self, *scopes, **kwargs):
            if hang.is_set():
                time.sleep(30)
            return AccessToken("token", int(time.time()) + 3600)

        def close(self):
            pass

    monkeypatch.setattr(azure.identity, "DefaultAzureCredential", Credential)
    ws = {"subscription_id": "sub-1", "resource_group": "rg-1", "workspace": "ws-1"}
    client = registry.open_workspace(ws, 7, time.monotonic() + 7)

    assert isinstance(client, MLClient)
    [inner] = made
    assert inner.kwargs == {"process_timeout": 7, "exclude_managed_identity_credential": True,
                            "exclude_interactive_browser_credential": True, "exclude_broker_credential": True}  # fmt: skip
    assert isinstance(client._credential, registry.BoundedCredential)
    assert client._credential.inner is inner and client._credential.seconds == 7
    scope = client._operation_scope
    assert (scope.subscription_id, scope.resource_group_name, scope.workspace_name) == ("sub-1", "rg-1", "ws-1")
    assert client._operation_config._enable_telemetry is False
    assert {k: client._kwargs[k] for k in ("connection_timeout", "read_timeout", "retry_total", "retry_connect",
                                           "retry_backoff_max")} == {"connection_timeout": 7, "read_timeout": 60,
                                                                     "retry_total": 3, "retry_connect": 1,
                                                                     "retry_backoff_max": 10}  # fmt: skip
    retry = client._service_client_10_2023._config.retry_policy
    assert (retry.total_retries, retry.connect_retries) == (3, 1)
    # every later token request the SDK makes goes through the deadline
    hang.set()
    start = time.monotonic()
    with pytest.raises(registry.StageError, match=r"Azure sign-in got no answer within 7 s \(upload.timeout_s\)"):
        client._credential.get_token(registry.ARM_SCOPE)
    assert time.monotonic() - start < 7 + BUSY_HOST_S
