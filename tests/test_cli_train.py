"""`nucleae train`: defaults from one source, auto sizes, no silent overwrite, honest resume."""

from __future__ import annotations

import contextlib
import json

import pytest

from napari_nucleae.cli import build_parser, main, model_config
from napari_nucleae.core.model import AUTO, ModelConfig
from napari_nucleae.core.store import Project

QUICK = ["--blocks", "2", "--filters", "4", "--min-steps", "0", "--epochs", "1"]


@pytest.fixture
def project(tmp_path, random_project) -> Project:
    """80 random crops of varied brightness from two images."""
    return random_project(tmp_path / "project", 80, 2)


def _train(project: Project, *options: str) -> int:
    return main(["train", "--project", str(project.path), *QUICK, *options])


def _stored_config(project: Project, name: str = "default") -> dict:
    return json.loads((project.model_dir(name) / "config.json").read_text())["config"]


def test_model_option_defaults_are_the_model_config_defaults():
    args = build_parser().parse_args(["train", "--project", "p"])
    assert model_config(args, 64) == ModelConfig("ae", 64)
    assert ModelConfig("ae", 64).latent_dim == AUTO


def test_auto_latent_size_is_chosen_and_reported(project, capsys):
    assert _train(project, "--latent-dim", "auto") == 0
    out = capsys.readouterr().out
    dim = _stored_config(project)["latent_dim"]
    assert dim >= 16 and f"note: latent size {dim} chosen from the crops (auto)" in out
    assert "warning: " in out  # one epoch of random crops: too few steps, said once ...
    assert "UserWarning" not in capsys.readouterr().err  # ... not again as a Python warning


def test_retraining_a_name_needs_overwrite_and_resume_refuses_other_settings(project, capsys):
    assert _train(project, "--latent-dim", "8") == 0
    first = (project.model_dir("default") / "last.pt").read_bytes()
    assert _train(project, "--latent-dim", "8") == 1
    assert "already exists" in capsys.readouterr().err
    assert (project.model_dir("default") / "last.pt").read_bytes() == first

    assert _train(project, "--resume", "--latent-dim", "99") == 1
    err = capsys.readouterr().err
    assert "cannot resume with different settings (latent_dim)" in err
    assert _train(project, "--resume") == 0  # the stored settings, unchanged
    assert "trained on cpu for 2 epochs" in capsys.readouterr().out
    assert _train(project, "--latent-dim", "8", "--overwrite", "--arch", "reference") == 0
    assert _stored_config(project)["arch"] == "reference"


@pytest.mark.parametrize("bad", [["--lr", "nan"], ["--lr", "1e6"], ["--latent-dim", "-3"]])
def test_impossible_settings_are_refused_without_a_traceback(project, capsys, bad):
    usage_error = bad[0] == "--latent-dim"  # argparse: exit 2 with a usage line
    with pytest.raises(SystemExit) if usage_error else contextlib.nullcontext():
        assert _train(project, *bad) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip()
    assert Project.open(project.path).meta.active_model is None
