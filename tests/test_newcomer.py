"""What a new user meets first, beyond the demo: the licence in what pip installs, a clear
message when a part's extra is missing, and the notebook opening from the set-up venv."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = "examples/outage_walkthrough.ipynb"
NOTEBOOK_COMMAND = f".venv/bin/jupyter notebook {NOTEBOOK}"

# -- the licence ----------------------------------------------------------------------


def _source_copy(destination: Path) -> Path:
    """The files of the checkout (tracked and new, not ignored) copied to ``destination``,
    so that building leaves nothing in the checkout."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


# setuptools' build backend rewrites sys.argv, so the output folder is read first.
_BUILD = """
import sys
from setuptools import build_meta

out = sys.argv[1]
print(build_meta.build_wheel(out))
print(build_meta.build_sdist(out))
"""


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The wheel and the sdist, built from a copy of the checkout without network (the
    installed setuptools, no build isolation)."""
    if not (ROOT / ".git").exists():
        pytest.fail("the packaging test builds from a git checkout (git ls-files)")
    source = _source_copy(tmp_path_factory.mktemp("source"))
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-c", _BUILD, str(out)],
        cwd=source,
        capture_output=True,
        check=True,
        timeout=110,
    )
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return wheel, sdist


def test_the_licence_is_mit_and_names_the_authors() -> None:
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License")
    assert "Copyright (c) 2026 the callpolicy authors" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS"' in text


def test_the_wheel_carries_the_licence_and_says_mit(artifacts: tuple[Path, Path]) -> None:
    wheel, _ = artifacts
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (licence,) = [name for name in names if name.endswith(".dist-info/licenses/LICENSE")]
        assert archive.read(licence) == (ROOT / "LICENSE").read_bytes()
        (metadata,) = [name for name in names if name.endswith(".dist-info/METADATA")]
        headers = archive.read(metadata).decode().split("\n\n", 1)[0].splitlines()
    assert "License-Expression: MIT" in headers
    assert "License-File: LICENSE" in headers


def test_the_sdist_carries_the_licence_docs_and_examples(artifacts: tuple[Path, Path]) -> None:
    _, sdist = artifacts
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
        top = sdist.name.removesuffix(".tar.gz")
        licence = archive.extractfile(f"{top}/LICENSE")
        assert licence is not None
        assert licence.read() == (ROOT / "LICENSE").read_bytes()
    # The README names these files; the sdist is where a reader without the repo finds them.
    for name in ("README.md", "docs/benchmarks.md", "docs/how-it-works.md", NOTEBOOK):
        assert name in names, name
    assert "examples/quickstart.py" in names


# -- a missing extra says which extra -------------------------------------------------

# Runs in a fresh interpreter: a finder first on sys.meta_path makes the named top-level
# packages unimportable (as if never installed), then imports the part and prints the error.
_IMPORT_WITHOUT = """
import importlib
import importlib.abc
import json
import sys

blocked = set(sys.argv[1].split(","))


class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
try:
    importlib.import_module(sys.argv[2])
except ImportError as error:
    print(json.dumps({"type": type(error).__name__, "message": str(error), "name": error.name}))
else:
    print(json.dumps(None))
"""


def _import_without(blocked: str, module: str) -> dict[str, Any] | None:
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_WITHOUT, blocked, module],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    found: dict[str, Any] | None = json.loads(done.stdout)
    return found


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [
        ("langchain_breaker", "langchain_core", "langchain"),
        ("llamaindex_breaker", "llama_index", "llamaindex"),
        # llama-index-core installed without its instrumentation package: the case that
        # used to say only "No module named 'llama_index_instrumentation'"
        ("llamaindex_breaker", "llama_index_instrumentation", "llamaindex"),
        ("callpolicy.redis", "redis", "redis"),
        ("callpolicy.otel", "opentelemetry", "otel"),
    ],
)
def test_importing_a_part_without_its_extra_names_the_extra_to_install(
    module: str, blocked: str, extra: str
) -> None:
    error = _import_without(blocked, module)
    assert error is not None, f"{module} imported with {blocked} missing"
    assert error["type"] == "ModuleNotFoundError"
    assert f'pip install "callpolicy[{extra}]"' in error["message"]
    assert error["message"].startswith(f"{module} needs ")
    assert error["name"] == blocked  # still says which module is missing


@pytest.mark.parametrize(
    "module", ["langchain_breaker", "llamaindex_breaker", "callpolicy.redis", "callpolicy.otel"]
)
def test_with_its_extra_installed_each_part_imports(module: str) -> None:
    # The control for the test above: the same subprocess, nothing blocked.
    assert _import_without("not-a-package", module) is None


def test_the_engine_imports_without_any_extra() -> None:
    blocked = "langchain_core,llama_index,llama_index_instrumentation,redis,opentelemetry"
    assert _import_without(blocked, "callpolicy") is None


# -- the notebook opens from the set-up venv ------------------------------------------


def test_the_readme_says_the_one_command_that_opens_the_notebook() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"`{NOTEBOOK_COMMAND}`" in readme
    assert "`--allow-root`" in readme


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _get(url: str, token: str) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:  # 127.0.0.1 only
        return json.load(response)


@pytest.fixture
def notebook_server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The README's notebook command, run with the venv's own ``jupyter`` script, plus the
    options that keep it on 127.0.0.1 without a browser; its config and runtime files in
    ``tmp_path``."""
    jupyter = Path(sys.executable).parent / "jupyter"
    assert jupyter.exists(), f"the notebook extra installs {jupyter}"
    port, token = _free_port(), "docs-test-token"
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "NO_PROXY": "127.0.0.1,localhost",
    }
    command = [
        str(jupyter),
        *NOTEBOOK_COMMAND.split()[1:],
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        # JupyterLab's extension manager would look packages up on PyPI: tests stay on
        # 127.0.0.1.
        "--LabApp.extension_manager=readonly",
        # Jupyter refuses to run as root without it (CI runs as root); the README says so.
        *(["--allow-root"] if os.geteuid() == 0 else []),
    ]
    server = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                _get(f"{base}/api/status", token)
                break
            except (urllib.error.URLError, ConnectionError):
                if server.poll() is not None or time.monotonic() > deadline:
                    _, errors = server.communicate(timeout=10)
                    pytest.fail(f"the notebook server did not start:\n{errors.decode()[-3000:]}")
                time.sleep(0.2)
        yield base, token
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if server.stderr is not None:
            server.stderr.close()


def test_the_notebook_command_serves_the_walkthrough_with_a_kernel_for_it(
    notebook_server: tuple[str, str],
) -> None:
    base, token = notebook_server
    # Given a notebook, the server serves the notebook's folder: the file is at its root.
    opened = _get(f"{base}/api/contents/{Path(NOTEBOOK).name}", token)
    assert opened["type"] == "notebook"
    cells = opened["content"]["cells"]
    assert any(cell["cell_type"] == "code" for cell in cells)
    wanted = opened["content"]["metadata"]["kernelspec"]["name"]
    kernels = _get(f"{base}/api/kernelspecs", token)["kernelspecs"]
    assert wanted in kernels, f"the notebook asks for kernel {wanted!r}; the server has {kernels}"
