"""Bad command-line input is one line and exit status 2, before anything runs or is
logged (in-process: the console script's own ``main``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from recscale.cli import main


@pytest.mark.parametrize(("flag", "value", "needle"), [
    ("--budget-flops", "inf", "budget_flops: Input should be a finite number"),
    ("--budget-flops", "nan", "budget_flops: Input should be a finite number"),
    ("--budget-flops", "-1", "budget_flops: Input should be greater than 0"),
    ("--max-flops-per-example", "inf", "max_flops_per_example: Input should be a finite number"),
    ("--startup-trials", "0", "startup_trials: Input should be greater than or equal to 1"),
    ("--trial-patience", "-2", "trial_patience: Input should be greater than or equal to 1"),
])
def test_non_finite_or_negative_budgets_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str], flag: str,
                                                    value: str, needle: str) -> None:
    import ray

    monkeypatch.chdir(tmp_path)
    options = {"--budget-flops": "1e9", flag: value}
    args = ["search", "--data", "synthetic", "--name", "bad",
            "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--storage", str(tmp_path / "ray"),
            *(item for pair in options.items() for item in pair)]
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("recscale: error:") and needle in lines[0], lines
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "ray").exists()
    assert not ray.is_initialized()


def test_startup_trials_without_tpe_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """TPE's warm-up means nothing to random search or NSGA-II: one line, not ignored."""
    monkeypatch.chdir(tmp_path)
    for extra in (["--searcher", "random"], ["--objective", "multi"]):
        assert main(["search", "--data", "synthetic", "--budget-flops", "1e9", "--name", "s",
                     "--startup-trials", "20", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "startup_trials is TPE's random warm-up" in err[0], err
    assert not any(tmp_path.iterdir())


def test_a_history_space_on_data_without_histories_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The sequences space samples K > 0; on data loaded without --sequences every such
    sample would be dropped as infeasible: one line instead, nothing written."""
    monkeypatch.chdir(tmp_path)
    args = ["search", "--space", "sequences", "--data", "synthetic", "--max-rows", "2000",
            "--budget-flops", "1e10", "--name", "noseq",
            "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--storage", str(tmp_path / "ray")]
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "model.seq_len = [16, 64, 256]" in lines[0], lines
    assert "--sequences" in lines[0]
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "ray" / "noseq").exists()


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("search", "train", "ui", "analyze", "export", "demo"):
        assert command in out


def test_resume_of_a_search_that_never_ran_is_refused(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """``--resume`` requires an interrupted search: without one, one line and exit 2."""
    import ray

    monkeypatch.chdir(tmp_path)
    assert main(["search", "--data", "synthetic", "--budget-flops", "1e9", "--name", "gone",
                 "--storage", str(tmp_path / "ray"), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no interrupted search 'gone'" in err[0] and "to resume" in err[0], err
    assert not ray.is_initialized()
