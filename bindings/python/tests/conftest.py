"""Shared fixtures: one GPU context, the tiny random model (written by the repo's cargo
example into a temporary directory) and, when ``EMBER_TEST_MODEL`` is set, SmolLM2."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import ember

#: The repository root (this file is ``bindings/python/tests/conftest.py``).
REPO = Path(__file__).resolve().parents[3]


def pytest_report_header(config):
    try:
        return f"ember {ember.version()} (ABI {ember.abi_version()}) from {ember.lib_path()}"
    except ember.EmberError as e:
        return f"ember: library not loaded: {e}"


@pytest.fixture(scope="session")
def repo() -> Path:
    """The repository root (fixtures and the header live there)."""
    return REPO


@pytest.fixture(scope="session")
def ctx():
    """One context (GPU device) for the whole run."""
    with ember.Context() as c:
        yield c


def _write_tiny(tmp_path_factory, variant: str, quant: str) -> str:
    """A tiny model written by ``cargo run -p ember-tests --example write_tiny``."""
    cargo = shutil.which("cargo")
    if cargo is None or not (REPO / "Cargo.toml").is_file():
        pytest.skip("needs cargo and the repository (or EMBER_TINY_MODEL) for the tiny model")
    out = tmp_path_factory.mktemp("tiny") / f"tiny-{variant}.gguf"
    cmd = [
        cargo,
        "run",
        "-q",
        "--release",
        "-p",
        "ember-tests",
        "--example",
        "write_tiny",
        "--",
        str(out),
        variant,
        "gguf",
        quant,
    ]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0 or not out.is_file():
        pytest.fail(f"write_tiny failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return str(out)


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory) -> str:
    """The tiny random Llama (vocab 256, 2 layers, Q4_1, 73 KB), written by
    ``cargo run -p ember-tests --example write_tiny`` (``$EMBER_TINY_MODEL`` overrides)."""
    given = os.environ.get("EMBER_TINY_MODEL")
    if given:
        return given
    return _write_tiny(tmp_path_factory, "llama", "q4_1")


@pytest.fixture(scope="session")
def tiny_moe(ctx, tmp_path_factory):
    """The tiny random Mixtral (4 experts, top-2, Q8_0), loaded once."""
    with ember.Model(ctx, _write_tiny(tmp_path_factory, "mixtral", "q8_0")) as m:
        yield m


@pytest.fixture(scope="session")
def tiny(ctx, tiny_path):
    """The tiny model, loaded once."""
    with ember.Model(ctx, tiny_path) as m:
        yield m


@pytest.fixture
def tiny_session(tiny):
    """A fresh session on the tiny model (128-token context, 2 sequences)."""
    with ember.Session(tiny, n_ctx=128, n_seq=2) as s:
        yield s


@pytest.fixture(scope="session")
def smol_path() -> str:
    """SmolLM2-135M-Instruct (``$EMBER_TEST_MODEL``, from ``scripts/fetch-model.sh``)."""
    p = os.environ.get("EMBER_TEST_MODEL")
    if not p:
        pytest.skip("EMBER_TEST_MODEL is not set (scripts/fetch-model.sh prints the path)")
    return p


@pytest.fixture(scope="session")
def smol(ctx, smol_path):
    """SmolLM2, loaded once."""
    with ember.Model(ctx, smol_path) as m:
        yield m


@pytest.fixture(scope="session")
def smol_session(smol):
    """One session on SmolLM2 for the whole run."""
    with ember.Session(smol, n_ctx=1024) as s:
        yield s
