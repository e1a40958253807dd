"""The client SDKs in client-sdks/: current with the spec, reproducible, and usable as shipped."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from helpers import ServiceProcess, ensure_debian_packages, service_env
from test_embedded import mint

ROOT = Path(__file__).resolve().parent.parent
SDKS = ROOT / "client-sdks"
GENERATE = ROOT / "scripts" / "generate_sdks.py"


@pytest.fixture(scope="module")
def generator_tools() -> None:
    """openapi-generator runs on Java and the Go SDK is formatted by gofmt: install them when missing."""
    ensure_debian_packages(("/usr/bin/java", "/usr/bin/gofmt", "/usr/bin/go"), ("default-jre-headless", "golang-go"))


def _generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GENERATE), *args], capture_output=True, text=True, timeout=600)


def test_committed_sdks_are_what_generation_gives_today(generator_tools) -> None:
    # The committed tree came from an earlier run: equal bytes also show generation is reproducible.
    done = _generate("--check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "up to date" in done.stdout


def test_check_names_the_files_of_a_stale_sdk(generator_tools, tmp_path: Path) -> None:
    copy = tmp_path / "client-sdks"
    shutil.copytree(SDKS, copy)
    api = copy / "python" / "email_service_client" / "api" / "accounts_api.py"
    api.write_text(api.read_text().replace("def list_accounts(", "def list_accounts_renamed(", 1))
    (copy / "go" / "api_extra.go").write_text("package emailserviceclient\n")
    shutil.rmtree(copy / "typescript" / "src" / "models")
    done = _generate("--check", "--out", str(copy))
    assert done.returncode == 1
    assert "accounts_api.py" in done.stderr and "api_extra.go" in done.stderr and "models" in done.stderr
    assert "run ./scripts/sdk" in done.stderr


def test_sdks_carry_the_spec_package_settings_and_every_operation() -> None:
    import email_service_client

    package_json = (SDKS / "typescript" / "package.json").read_text()
    assert '"name": "@metabuilder/email-service-client"' in package_json
    assert '"version": "1.0.0"' in package_json
    assert 'version = "1.0.0"' in (SDKS / "python" / "pyproject.toml").read_text()
    assert (SDKS / "go" / "go.mod").read_text().startswith("module github.com/metabuilder/email-service-client")

    spec = yaml.safe_load((ROOT / "spec" / "openapi.yaml").read_text())
    operation_ids = [
        op["operationId"] for path in spec["paths"].values() for op in path.values() if "operationId" in op
    ]
    python_methods = {
        name
        for api in dir(email_service_client)
        if api.endswith("Api")
        for name in dir(getattr(email_service_client, api))
    }
    ts_apis = "".join(p.read_text() for p in (SDKS / "typescript" / "src" / "apis").glob("*.ts"))
    go_apis = "".join(p.read_text() for p in (SDKS / "go").glob("api_*.go"))
    for operation_id in operation_ids:
        assert re.sub(r"(?<!^)([A-Z])", r"_\1", operation_id).lower() in python_methods, operation_id
        assert f"async {operation_id}(" in ts_apis, operation_id
        assert f") {operation_id[0].upper()}{operation_id[1:]}(" in go_apis, operation_id


NEEDS_NPM = pytest.mark.skipif(
    shutil.which("npm") is None, reason="npm is not installed (Node.js is needed nowhere else)"
)


@pytest.fixture(scope="module")
def typescript_build(tmp_path_factory) -> Path:
    """The TypeScript SDK built as a user builds it (npm install, npm run build), under node_modules/ of a project."""
    project = tmp_path_factory.mktemp("ts-user")
    work = project / "node_modules" / "@metabuilder" / "email-service-client"
    shutil.copytree(SDKS / "typescript", work)
    for step in (["npm", "install", "--no-audit", "--no-fund"], ["npm", "run", "build"]):
        done = subprocess.run(step, cwd=work, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{' '.join(step)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return work


@NEEDS_NPM
def test_typescript_sdk_builds_with_npm(typescript_build: Path) -> None:
    work = typescript_build
    assert (work / "dist" / "index.js").exists() and (work / "dist" / "index.d.ts").exists()
    assert (work / "dist" / "esm" / "index.js").exists()
    assert "listAccounts" in (work / "dist" / "apis" / "AccountsApi.d.ts").read_text()


# The same journey in both module systems: create an account, then find it in the list.
_TS_JOURNEY = """
const api = new sdk.AccountsApi(new sdk.Configuration({ basePath: process.env.BASE, accessToken: process.env.TOKEN }));
const created = await api.createAccount({ createAccountRequest: {
  accountName: process.env.NAME, emailAddress: "ts@example.com", protocol: "imap", hostname: "imap.example.com",
  port: 993, encryption: "tls", username: "ts@example.com", password: "app-password", isSyncEnabled: false } });
const listed = await api.listAccounts();
let refused = null;
try { await new sdk.AccountsApi(new sdk.Configuration({ basePath: process.env.BASE })).listAccounts(); }
catch (error) { refused = error.response.status; }
console.log(JSON.stringify({ id: created.id, names: listed.accounts.map((a) => a.accountName), refused }));
"""
_TS_PACKAGE = "@metabuilder/email-service-client"
_TS_CLIENTS = {
    "cjs": ("journey.cjs", f"const sdk = require('{_TS_PACKAGE}');\n(async () => {{{_TS_JOURNEY}}})();"),
    "esm": ("journey.mjs", f"import * as sdk from '{_TS_PACKAGE}';\n{_TS_JOURNEY}"),
    "esm-build": ("direct.mjs", "const sdk = await import(process.env.ESM_BUILD);\n" + _TS_JOURNEY),
}


@NEEDS_NPM
@pytest.mark.parametrize("flavour", sorted(_TS_CLIENTS))
def test_the_built_typescript_client_drives_the_running_service(flavour, typescript_build, backing, tmp_path) -> None:
    """CommonJS (require), ES modules through the package (import) and the ESM build itself, in plain Node."""
    env = service_env(backing, EMAIL_SERVICE_RATE_LIMITS="false")
    service = ServiceProcess(env, tmp_path, "--no-embedded-worker")
    try:
        service.wait_healthy()
        project = typescript_build.parent.parent.parent
        name, source = _TS_CLIENTS[flavour]
        (project / name).write_text(source)
        done = subprocess.run(
            ["node", name],
            cwd=project,
            env={
                "PATH": os.environ["PATH"],
                "BASE": service.url,
                "TOKEN": mint(env, uuid.uuid4(), uuid.uuid4()),
                "NAME": f"From {flavour}",
                "ESM_BUILD": (typescript_build / "dist" / "esm" / "index.js").as_uri(),
            },
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        service.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == ""  # no module-type warning, nothing re-parsed
    answer = json.loads(done.stdout)
    assert answer["names"] == [f"From {flavour}"] and answer["id"] and answer["refused"] == 401


def test_go_sdk_is_gofmt_clean_and_compiles(generator_tools, tmp_path: Path) -> None:
    done = subprocess.run(["gofmt", "-l", str(SDKS / "go")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "", done.stdout + done.stderr
    # The client needs nothing beyond Go's standard library, so it builds with no module downloads.
    work = tmp_path / "go"
    shutil.copytree(SDKS / "go", work)
    env = {**os.environ, "GOPROXY": "off", "GOFLAGS": "-mod=mod", "GOCACHE": str(tmp_path / "cache")}
    built = subprocess.run(["go", "build", "."], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
