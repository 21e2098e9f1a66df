"""What a user does on one machine: ``ray start --head``, then ``ray job submit -- excb pretrain ...`` from another
process with Ray's token authentication on, then that Ray is stopped by PID (the processes this test started only).
The job's console, streamed back to the submitting shell, is also where the quiet default of ``excb pretrain`` is
checked (``testkit.console``).

Ray 2.60's ``ray start --head`` turns token authentication on when ``RAY_AUTH_MODE`` is unset and a token exists
(``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``; ``ray.init()`` of a local instance writes the
latter, so most users have one). A submitting shell must set ``RAY_AUTH_MODE=token`` *and* reach the token, or the
dashboard answers 401 "Missing authentication token". Every process here gets its own ``HOME``, so the user's own
``~/.ray/auth_token`` is neither read nor written.

Only one Ray instance may run on the machine at a time: run this under ``flock /tmp/excb-ray.lock``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from testkit.configs import TINY
from testkit.console import assert_quiet_pretrain_output
from testkit.net import free_port

from excb.rundir.checkpoint import list_checkpoints, read_state_dir
from excb.rundir.runfiles import read_metrics

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
START_TIMEOUT_S = 180
JOB_TIMEOUT_S = 900


def _env(home: Path, **auth: str) -> dict[str, str]:
    """The environment of a shell on this machine whose user's home is ``home``, with only the given RAY_AUTH_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH_", "RAY_ADDRESS"))}
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0")
    env.update(auth)
    return env


def _run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


def _get(url: str, token: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _ours(temp_dir: str, head: psutil.Process) -> list[psutil.Process]:
    """The processes this test's Ray consists of: ``ray start --block`` and its descendants, plus any process
    naming this Ray's own temp dir (one reparented away from the tree). No other Ray instance is touched."""
    procs = {}
    try:
        if head.is_running():
            procs[head.pid] = head
            procs.update({p.pid: p for p in head.children(recursive=True)})
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter(["cmdline"]):
        if any(temp_dir in arg for arg in p.info["cmdline"] or []):
            procs.setdefault(p.pid, p)
    return list(procs.values())


def _running(p: psutil.Process) -> bool:
    """Still running: a zombie (exited, not yet reaped by its parent or by PID 1) does not count."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while (alive := [p for p in procs if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def _stop(temp_dir: str, proc: subprocess.Popen[bytes], head: psutil.Process) -> None:
    """Stop this Ray by PID, as ``ray stop`` would but only ours: SIGTERM to ``ray start --block`` and every
    process it started (it has no SIGTERM handler of its own and leaves them running), SIGKILL after a grace
    period to whatever is still there."""
    started = [p for p in _ours(temp_dir, head) if p.pid != proc.pid]
    proc.terminate()
    for p in started:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    alive = _wait_gone(started, timeout=8)
    stragglers = list({q.pid: q for q in alive + [q for q in _ours(temp_dir, head) if _running(q)]}.values())
    for p in stragglers:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    _wait_gone(stragglers, timeout=10)


@pytest.fixture()
def ray_head(tmp_path: Path) -> Iterator[dict[str, object]]:
    """``ray start --head --block`` with its own temp dir, ports and HOME (holding ~/.ray/auth_token). The session's
    shared test instance steps aside first: with two Ray instances on the machine, Ray Train's placement-group
    cleaner inside the job fails to find its cluster ("Found multiple active Ray instances")."""
    import ray

    ray.shutdown()
    home = tmp_path / "head-home"
    home.mkdir()
    # the documented way to make a token: written to ~/.ray/auth_token of this HOME
    made = _run([RAY, "get-auth-token", "--generate"], _env(home))
    assert made.returncode == 0, made.stderr
    token_file = home / ".ray" / "auth_token"
    token = token_file.read_text().strip()
    assert token and token in made.stdout
    temp_dir = tempfile.mkdtemp(prefix="excb-rj-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    dashboard = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dashboard, "--ray-client-server-port": free_port(),
             "--node-manager-port": free_port(), "--object-manager-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port()}
    log = (tmp_path / "ray-start.log").open("w")
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2", "--num-gpus=0",
         "--object-store-memory=400000000", "--disable-usage-stats", *(f"{k}={v}" for k, v in ports.items())],
        env=_env(home),  # RAY_AUTH_MODE unset: Ray's default for `ray start --head` decides
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = psutil.Process(proc.pid)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # the job API answers (with the token) once the head is ready
            assert proc.poll() is None, (tmp_path / "ray-start.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the Ray head did not come up"
            try:
                if _get(f"{url}/api/jobs/", token)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(1)
        yield {"url": url, "token": token, "token_file": token_file, "home": home, "temp_dir": temp_dir,
               "log": tmp_path / "ray-start.log"}
    finally:
        _stop(temp_dir, proc, head)
        log.close()
        leftovers = [p for p in _ours(temp_dir, head) if _running(p)]
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftovers, [p.cmdline() for p in leftovers]


def test_ray_start_head_default_turns_auth_on_only_with_a_token(tmp_path: Path) -> None:
    """The check `ray start --head` makes (scripts.py calls it before starting the node): with RAY_AUTH_MODE unset
    and no token anywhere, authentication stays off; the running head in the next test shows the other branch."""
    empty = tmp_path / "empty-home"
    empty.mkdir()
    probe = ("from ray._private.authentication.authentication_token_setup import "
             "maybe_enable_token_auth_if_token_available as f; print(f(warn_if_disabled=False))")
    out = _run([sys.executable, "-c", probe], _env(empty))
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "False", out.stderr
    (empty / ".ray").mkdir()
    (empty / ".ray" / "auth_token").write_text("a-token-for-this-check")
    out = _run([sys.executable, "-c", probe], _env(empty))
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "True", out.stderr


def test_ray_job_submit_excb_pretrain_with_token_auth(ray_head: dict[str, object], shards: str,
                                                      tmp_path: Path) -> None:
    url, token = str(ray_head["url"]), str(ray_head["token"])
    # `ray start --head` (RAY_AUTH_MODE unset) found ~/.ray/auth_token and turned token authentication on
    status, body = _get(f"{url}/api/authentication_mode")
    assert status == 200 and json.loads(body)["authentication_mode"] == "token"
    assert "Token authentication is enabled" in Path(str(ray_head["log"])).read_text()

    # another user's shell (another machine, as far as tokens go): its HOME has no ~/.ray/auth_token
    laptop = tmp_path / "laptop-home"
    laptop.mkdir()
    copied = tmp_path / "copied_token"
    shutil.copy(str(ray_head["token_file"]), copied)
    probe = [RAY, "job", "submit", "--address", url, "--", "echo", "hello"]
    # nothing set: the guide's old command fails with an authentication error
    no_token = _run(probe, _env(laptop))
    assert no_token.returncode != 0
    assert "Missing authentication token" in no_token.stdout + no_token.stderr
    # the token is there, but without RAY_AUTH_MODE=token the client does not send it
    no_mode = _run(probe, _env(laptop, RAY_AUTH_TOKEN_PATH=str(copied)))
    assert no_mode.returncode != 0
    assert "Missing authentication token" in no_mode.stdout + no_mode.stderr
    # a wrong token is refused too
    wrong = _run(probe, _env(laptop, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not-the-token"))
    assert wrong.returncode != 0
    assert "Invalid authentication token" in wrong.stdout + wrong.stderr

    # RAY_AUTH_MODE=token and the token file: the tiny run goes through
    runs = tmp_path / "runs"
    entry = ["excb", "pretrain", "--storage-path", str(runs), "--name", "tiny", *TINY, f"data.path={shards}",
             "train.epochs=2", "train.max_steps_per_epoch=2", "train.log_every_steps=1", "eval.final_eval=false"]
    job = _run([RAY, "job", "submit", "--address", url, "--submission-id", "excb-tiny", "--", *entry],
               _env(laptop, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(copied)), timeout=JOB_TIMEOUT_S)
    (tmp_path / "job.log").write_text(job.stdout + job.stderr)
    assert job.returncode == 0, (job.stdout + job.stderr)[-6000:]
    assert "succeeded" in job.stdout.lower()
    # the job's console, streamed back to the submitting shell: quiet by default, and no Ray traceback
    assert "Traceback" not in job.stdout + job.stderr, (job.stdout + job.stderr)[-6000:]
    assert_quiet_pretrain_output(job.stdout, epochs=2, steps=2)
    # on the head machine, as the user who started Ray: RAY_AUTH_MODE=token and the default ~/.ray/auth_token
    status_cli = _run([RAY, "job", "status", "--address", url, "excb-tiny"],
                      _env(Path(str(ray_head["home"])), RAY_AUTH_MODE="token"))
    assert status_cli.returncode == 0, status_cli.stderr
    assert "Job 'excb-tiny' succeeded" in status_cli.stdout
    status, body = _get(f"{url}/api/jobs/excb-tiny", token)
    assert status == 200 and json.loads(body)["status"] == "SUCCEEDED"
    # the run wrote its metrics and its checkpoint
    run_dir = runs / "tiny"
    history = read_metrics(str(run_dir))
    assert [r["epoch"] for r in history] == [1, 2] and history[-1]["step"] == 4
    ckpts = list_checkpoints(str(run_dir))
    assert [Path(c).name for c in ckpts] == ["checkpoint_epoch0001", "checkpoint_epoch0002"]
    assert read_state_dir(ckpts[-1])["epoch"] == 2
