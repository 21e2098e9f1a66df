"""What ``excb pretrain | sweep | bench`` print: Ray's and the libraries' own output hidden unless ``--verbose``.

Fast tests of the flag and of the settings each side gets; one Ray test runs ``excb pretrain --verbose`` as a
subprocess (joined to the session's Ray instance, as ``RAY_ADDRESS`` would on a cluster). The quiet default is
checked on a submitted job's output in ``tests/test_job_submit.py`` (``testkit.console``).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
from testkit.configs import TINY
from testkit.console import excb_lines

from excb import console
from excb.cli import build_parser
from excb.cli import main as cli_main
from excb.run import startup


@pytest.fixture(autouse=True)
def _fresh_verbosity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    monkeypatch.setattr(console, "_verbose", None)


@pytest.mark.parametrize("command", ["pretrain", "sweep", "bench"])
def test_verbose_flag_parses_on_the_ray_commands(command: str) -> None:
    extra = ["--config", "s.yaml"] if command == "sweep" else []
    assert build_parser().parse_args([command, *extra, "a.b=1"]).verbose is False
    args = build_parser().parse_args([command, *extra, "--verbose", "a.b=1"])
    assert args.verbose is True and args.overrides == ["a.b=1"]
    assert build_parser().parse_args([command, *extra, "-v"]).verbose is True


def test_other_commands_have_no_verbose_flag() -> None:
    assert not hasattr(build_parser().parse_args(["report", "runs/x"]), "verbose")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["report", "--verbose", "runs/x"])


def test_verbosity_from_setting_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert console.is_verbose() is False
    for value, expected in (("1", True), ("yes", True), ("0", False), ("", False), ("false", False)):
        monkeypatch.setenv(console.VERBOSE_ENV, value)
        assert console.is_verbose() is expected, value
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    assert console.set_verbose(False) is None and console.is_verbose() is False  # the setting wins
    assert console.set_verbose(None) is False and console.is_verbose() is True


def test_cli_restores_verbosity_and_hides_warnings_only_when_quiet(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():
        warnings.resetwarnings()
        # an unknown key fails at load, before Ray: the filters are in place by then, and the setting is undone
        assert cli_main(["pretrain", "--storage-path", str(tmp_path), "train.epochz=3"]) == 2
        assert console.is_verbose() is False and console._verbose is None
        for category in console.HIDDEN_WARNINGS:
            assert _ignored(category), category
        assert not _ignored(UserWarning)
    with warnings.catch_warnings():
        warnings.resetwarnings()
        assert cli_main(["pretrain", "--verbose", "--storage-path", str(tmp_path), "train.epochz=3"]) == 2
        assert console._verbose is None  # restored after the command
        assert not _ignored(DeprecationWarning)
    assert "train.epochz" in capsys.readouterr().err


def _ignored(category: type[Warning]) -> bool:
    """Whether the current filters ignore a warning of ``category`` raised here (filters left as they are)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("probe", category, stacklevel=1)
    return not caught


def test_hide_library_warnings_wins_over_rays_own_filter() -> None:
    from ray.util.annotations import RayDeprecationWarning

    with warnings.catch_warnings():
        warnings.resetwarnings()
        console.hide_library_warnings()
        warnings.filterwarnings("module", category=RayDeprecationWarning)  # what `import ray` does
        assert not _ignored(RayDeprecationWarning)
        console.hide_library_warnings()  # called again after Ray's import: back in front
        assert _ignored(RayDeprecationWarning)
        assert len([f for f in warnings.filters if f[2] is DeprecationWarning]) == 1  # not piled up


def test_runtime_env_quiet_verbose_and_what_is_already_set() -> None:
    quiet = startup.ray_runtime_env(False, {}, environ={})
    assert quiet == {"env_vars": {"EXCB_VERBOSE": "0", "RAY_DATA_LOG_LEVEL": "WARNING",
                                  "PYTHONWARNINGS": "ignore::DeprecationWarning,"
                                                    "ignore::PendingDeprecationWarning,ignore::FutureWarning"},
                     "worker_process_setup_hook": "excb.console.quiet_ray_worker"}
    assert startup.ray_runtime_env(True, {}, environ={}) == {"env_vars": {"EXCB_VERBOSE": "1"}}
    # the user's own environment wins (a local Ray's workers inherit it) ...
    mine = startup.ray_runtime_env(False, {}, environ={"RAY_DATA_LOG_LEVEL": "DEBUG"})
    assert "RAY_DATA_LOG_LEVEL" not in mine["env_vars"]
    # ... and so does a submitted job's runtime env: Ray refuses to merge two values of one key
    job = {"env_vars": {"PYTHONWARNINGS": "error", "EXCB_VERBOSE": "1",
                        "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR": "their.hook"}}
    merged = startup.ray_runtime_env(False, job, environ={})
    assert merged == {"env_vars": {"RAY_DATA_LOG_LEVEL": "WARNING"}}
    assert "worker_process_setup_hook" not in startup.ray_runtime_env(False, {"worker_process_setup_hook": "x"},
                                                                       environ={})


def test_job_runtime_env_read_from_a_submitted_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert startup._job_runtime_env() == {}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"env_vars": {"A": "1"}}}')
    assert startup._job_runtime_env() == {"env_vars": {"A": "1"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "not json")
    assert startup._job_runtime_env() == {}


def test_train_logging_level_follows_verbosity() -> None:
    assert startup.train_logging_config().log_level == "WARNING"
    console.set_verbose(True)
    assert startup.train_logging_config().log_level == "INFO"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own, when its DataContext is first made
def test_driver_console_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.data import DataContext

    auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
    monkeypatch.setattr(auth, "filters", [])
    monkeypatch.setattr(DataContext.get_current(), "enable_progress_bars", True)
    monkeypatch.setattr(logging.getLogger(console.RAY_DATA_PROGRESS_LOGGER), "level", logging.NOTSET)
    console.set_verbose(True)
    startup.configure_console()  # verbose: Ray's defaults
    assert auth.filters == [] and DataContext.get_current().enable_progress_bars is True
    console.set_verbose(False)
    with warnings.catch_warnings():
        startup.configure_console()
        startup.configure_console()  # twice: one filter
        assert _ignored(DeprecationWarning)
    assert len(auth.filters) == 1 and DataContext.get_current().enable_progress_bars is False
    assert logging.getLogger(console.RAY_DATA_PROGRESS_LOGGER).level == logging.ERROR

    def shown(message: str) -> bool:
        return auth.filter(logging.LogRecord(auth.name, logging.WARNING, __file__, 1, message, None, None))

    assert not shown("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled ...")
    assert shown("Token authentication is disabled for this Ray cluster. Anyone with network access ...")


def test_quiet_worker_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    names = [console.RAY_DATA_PROGRESS_LOGGER] + [
        os.path.join(os.path.dirname(ray.__file__), *rel.split("/")) for rel in console.RAY_TRAIN_FILE_LOGGERS]
    for name in names:
        monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)
    with warnings.catch_warnings():
        warnings.resetwarnings()
        console.quiet_ray_worker()
        assert _ignored(FutureWarning) and not _ignored(RuntimeWarning)
    assert logging.getLogger(names[0]).level == logging.ERROR
    assert all(logging.getLogger(n).level == logging.WARNING for n in names[1:])
    # the logger Ray Train's per-report "TrainingReport(...)" line goes through is one of those
    from ray.train.v2._internal.execution import context

    assert context.logger.name in names


@pytest.mark.ray
def test_pretrain_console_verbose_on_request(ray_session: None, fm_shards, tmp_path: Path) -> None:
    """``--verbose`` brings Ray Train's own report lines back, and ours stay single. (Quiet by default is checked on
    the output of a submitted job: ``tests/test_job_submit.py``.)"""
    import ray

    shards = fm_shards(rows=256, rows_per_shard=128)
    env = {k: v for k, v in os.environ.items() if k not in (console.VERBOSE_ENV, "PYTHONWARNINGS")}
    env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address  # the session's Ray: one instance at a time

    cmd = [sys.executable, "-m", "excb.cli", "pretrain", "--verbose", "--storage-path", str(tmp_path), "--name",
           "verbose", *TINY, f"data.path={shards}", "train.epochs=1", "train.max_steps_per_epoch=2",
           "train.cpus_per_worker=0.5", "eval.final_eval=false", "eval.epoch_knn_train=0"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path)
    verbose = done.stdout + done.stderr
    assert done.returncode == 0, verbose[-5000:]
    assert "TrainingReport(" in verbose, verbose[-5000:]
    lines = excb_lines(verbose)
    assert [n for n, c in Counter(lines).items() if c > 1] == [], lines
    assert len([line for line in lines if line.startswith("[excb] epoch 1/1 loss ")]) == 1, lines
