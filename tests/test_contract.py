"""The spec is the seed contract plus additions, ships with the package, and every operation has a handler."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import email_service
from email_service.api.app import SPEC_PATH, load_spec
from email_service.api.resolver import handler_path

REPO = Path(__file__).resolve().parents[1]
CHECKER = REPO.parent / "shared" / "tools" / "check_contract.py"


def test_spec_keeps_every_promise_of_the_seed():
    if not CHECKER.exists():
        pytest.skip(f"the seed contract checker is not beside this checkout ({CHECKER})")
    result = subprocess.run(
        [sys.executable, str(CHECKER), str(REPO / "spec" / "openapi.yaml")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 contract breaks" in result.stdout


def test_the_package_serves_the_repository_spec():
    assert SPEC_PATH.read_bytes() == (REPO / "spec" / "openapi.yaml").read_bytes()
    assert SPEC_PATH.is_relative_to(Path(email_service.__file__).parent)


def test_every_operation_resolves_to_a_handler_function():
    operations = [
        op
        for item in load_spec()["paths"].values()
        for key, op in item.items()
        if isinstance(op, dict) and "operationId" in op
    ]
    assert operations
    for operation in operations:
        module_name, _, function_name = handler_path(operation).rpartition(".")
        function = getattr(importlib.import_module(module_name), function_name)
        assert callable(function), operation["operationId"]
