"""`pallava quickstart`'s recipe overrides: what reaches the run, and what stops it before any step."""

from __future__ import annotations

import pytest

from pallava.cli import main
from pallava.quickstart import Quickstart


@pytest.fixture
def captured(monkeypatch):
    """The settings each quickstart would run with; nothing is trained."""
    runs = []
    monkeypatch.setattr(Quickstart, "run", lambda self: runs.append(self.s) or [])
    return runs


def test_recipe_overrides_reach_the_run_settings(captured, tmp_path):
    argv = ["quickstart", "--out", str(tmp_path / "run"), "--stain-normalize", "macenko"]
    argv += ["--plip-set", "augment.grayscale=0.2", "--plip-set", "epochs=3"]
    argv += ["--train-set", "optim.lr=1e-3", "--train-set", "augment.image.hue=0.1"]
    assert main(argv) == 0
    (settings,) = captured
    assert settings.plip_args == ["augment.grayscale=0.2", "epochs=3", "stain_normalize=macenko"]
    assert settings.train_overrides == ["optim.lr=1e-3", "augment.image.hue=0.1"]
    # recorded with the run, so a re-run with other changes is refused
    assert settings.model_settings()["plip_args"] == settings.plip_args


@pytest.mark.parametrize(
    ("flag", "value", "named"),
    [
        ("--plip-set", "augment.graysale=0.2", "unknown key(s) ['graysale']"),
        ("--plip-set", "nosuch=1", "unknown key(s) ['nosuch']"),
        ("--plip-set", "epochs=oops", "epochs: expected float, got 'oops'"),
        ("--plip-set", "augment.grayscale", "must look like section.key=value"),
        ("--train-set", "augment.image.graysale=0.2", "augment.image: unknown key(s) ['graysale']"),
        ("--train-set", "optim.lr=abc", "optim.lr: expected float, got 'abc'"),
        ("--train-set", "train.batch_size=0", "train.batch_size must be at least 1, got 0"),
    ],
)
def test_a_bad_override_stops_the_run_before_any_step(captured, tmp_path, capsys, flag, value, named):
    out = tmp_path / "run"
    assert main(["quickstart", "--out", str(out), flag, value]) == 2
    assert named in capsys.readouterr().err
    assert captured == [] and not out.exists()
