#!/usr/bin/env python3
"""Generate the client SDKs in client-sdks/ from spec/openapi.yaml with openapi-generator.

The languages, generators and package settings come from the spec's ``x-sdk-generation``.
``--check`` generates into a temporary directory and fails when the committed SDKs differ.
Needs ``openapi-generator-cli`` (PyPI; it bundles the generator jar), a Java runtime (17+) and gofmt.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "spec" / "openapi.yaml"
GENERATOR_VERSION = "7.26.0"

# The spec names each SDK by the kind of output ("python-client"); openapi-generator calls its
# Python and Go client generators plain "python" and "go".
GENERATORS = {
    "typescript-fetch": "typescript-fetch",
    "python-client": "python",
    "go-client": "go",
}


def _generator(template: str) -> str:
    tool, _, name = template.partition(":")
    if tool != "openapi-generator" or name not in GENERATORS:
        raise SystemExit(f"x-sdk-generation: unsupported template {template!r}")
    return GENERATORS[name]


@dataclass(frozen=True)
class Sdk:
    language: str  # the directory under client-sdks/
    generator: str  # openapi-generator's name for it
    properties: dict[str, str]  # its --additional-properties
    repository: tuple[str, str]  # (user, repository) the generated README and Go module name

    def arguments(self) -> list[str]:
        return [
            "--generator-name",
            self.generator,
            "--additional-properties",
            ",".join(f"{key}={value}" for key, value in self.properties.items()),
            "--git-user-id",
            self.repository[0],
            "--git-repo-id",
            self.repository[1],
        ]


def _properties(language: str, scope: str, bare: str, version: str) -> dict[str, str]:
    """Each generator's own settings for the spec's one package name and version."""
    if language == "typescript":
        return {
            "npmName": f"@{scope}/{bare}" if scope else bare,
            "npmVersion": version,
            "supportsES6": "true",
            # Node resolves ES module imports only by their full file name: without the extension
            # the ESM build fails in plain Node with ERR_MODULE_NOT_FOUND for "./runtime".
            "importFileExtension": ".js",
        }
    if language == "python":
        return {
            "packageName": bare.replace("-", "_"),
            "projectName": f"{scope}-{bare}" if scope else bare,
            "packageVersion": version,
        }
    if language == "go":
        return {"packageName": re.sub(r"[^a-z0-9]", "", bare.lower()), "packageVersion": version}
    raise SystemExit(f"x-sdk-generation: no settings known for language {language!r}")


def sdk_targets(spec_path: Path = SPEC) -> list[Sdk]:
    """Every SDK the spec's x-sdk-generation asks for."""
    config = yaml.safe_load(spec_path.read_text())["x-sdk-generation"]
    extra = config.get("additionalProperties", {})
    package_name, version = extra["packageName"], str(extra["packageVersion"])
    # "@metabuilder/email-service-client" -> scope "metabuilder", bare name "email-service-client"
    scope, _, bare = package_name.lstrip("@").rpartition("/")
    return [
        Sdk(
            language,
            _generator(config["templates"][language]),
            _properties(language, scope, bare, version),
            (scope or bare, bare),
        )
        for language in config["languages"]
    ]


def _command() -> list[str]:
    found = shutil.which("openapi-generator-cli")
    if found is None:
        local = Path(sys.executable).with_name("openapi-generator-cli")
        if not local.exists():
            raise SystemExit(f"openapi-generator-cli not found: pip install openapi-generator-cli=={GENERATOR_VERSION}")
        found = str(local)
    if shutil.which("java") is None:
        raise SystemExit(
            "java not found: openapi-generator needs a Java runtime (apt-get install default-jre-headless)"
        )
    if shutil.which("gofmt") is None:
        raise SystemExit("gofmt not found: the Go SDK is formatted with it (apt-get install golang-go)")
    return [found]


def generate(out_dir: Path, spec_path: Path = SPEC) -> None:
    """Write every SDK under ``out_dir/<language>``, replacing what was there."""
    command = _command()
    for sdk in sdk_targets(spec_path):
        with tempfile.TemporaryDirectory() as scratch:
            target = Path(scratch) / sdk.language
            argv = [*command, "generate", "--input-spec", str(spec_path), "--output", str(target), *sdk.arguments()]
            # JAVA_TOOL_OPTIONS is what the bundled launcher passes on to the JVM.
            env = dict(os.environ, JAVA_TOOL_OPTIONS="-Xmx512m -Xshare:auto")
            done = subprocess.run(argv, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
                raise SystemExit(f"openapi-generator failed for {sdk.language}")
            if sdk.generator == "go":
                # The generator's Go is not gofmt-clean; Go users and their linters expect it to be.
                subprocess.run(["gofmt", "-w", str(target)], check=True)
            if sdk.generator == "typescript-fetch":
                _esm_for_node(target / "package.json")
            final = out_dir / sdk.language
            if final.exists():
                shutil.rmtree(final)
            final.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(target), final)


def _esm_for_node(package_json: Path) -> None:
    """Let Node load the ES module build as one, by ``import`` of the package or of dist/esm.

    The generator's package.json names the ESM build only for bundlers (``module``): Node would
    give ``import`` the CommonJS build, and parse dist/esm as CommonJS first (warning as it
    re-parses). The build marks dist/esm as ES modules and ``exports`` sends each loader to its build.
    """
    package = json.loads(package_json.read_text())
    mark_esm = r'''node -e "require('fs').writeFileSync('dist/esm/package.json', '{\"type\":\"module\"}\n')"'''
    package["scripts"]["build"] = f"{package['scripts']['build']} && {mark_esm}"
    package["exports"] = {
        ".": {
            "import": {"types": "./dist/esm/index.d.ts", "default": "./dist/esm/index.js"},
            "require": {"types": "./dist/index.d.ts", "default": "./dist/index.js"},
        }
    }
    package_json.write_text(json.dumps(package, indent=2) + "\n")


# What building or installing an SDK leaves beside its sources (git ignores these too).
BUILD_LEFTOVERS = re.compile(r"^(build|dist|node_modules|__pycache__|\.pytest_cache|.*\.egg-info)$")


def differences(left: Path, right: Path) -> list[str]:
    """Paths (relative) that differ between two trees, in either direction."""
    found: list[str] = []

    def walk(cmp: filecmp.dircmp, prefix: str) -> None:
        extra = [name for name in cmp.left_only + cmp.right_only if not BUILD_LEFTOVERS.match(name)]
        found.extend(prefix + name for name in extra + cmp.funny_files)
        _, mismatch, errors = filecmp.cmpfiles(cmp.left, cmp.right, cmp.common_files, shallow=False)
        found.extend(prefix + name for name in mismatch + errors)
        for name, sub in cmp.subdirs.items():
            if not BUILD_LEFTOVERS.match(name):
                walk(sub, f"{prefix}{name}/")

    walk(filecmp.dircmp(left, right, ignore=[]), "")
    return sorted(found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "client-sdks", help="where to write (default client-sdks/)")
    parser.add_argument("--check", action="store_true", help="fail if the SDKs in --out are stale against the spec")
    args = parser.parse_args(argv)
    if not args.check:
        generate(args.out)
        print(f"SDKs written to {args.out}")
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        fresh = Path(scratch)
        generate(fresh)
        stale = {}
        for sdk in sdk_targets():
            committed = args.out / sdk.language
            stale[sdk.language] = differences(committed, fresh / sdk.language) if committed.is_dir() else ["(missing)"]
    stale = {lang: paths for lang, paths in stale.items() if paths}
    if stale:
        for language, paths in stale.items():
            print(f"{language}: {len(paths)} stale: {', '.join(paths[:10])}", file=sys.stderr)
        print(
            "the SDKs are stale against spec/openapi.yaml: run ./scripts/sdk and commit client-sdks/", file=sys.stderr
        )
        return 1
    print("SDKs are up to date with the spec")
    return 0


if __name__ == "__main__":
    sys.exit(main())
