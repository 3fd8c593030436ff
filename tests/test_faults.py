"""Faults, injected into real files and real processes: kill -9 at every point of a checkpoint
write and at random times, damaged checkpoint files, a full disk (a small tmpfs, and ENOSPC
injected at every write site), a missing DeepSpeed, one of two processes killed. Each ends
as the reliability page's table says (docs/reliability.md): the run resumes to the same
metrics, or stops with one clear message and a documented exit code, never a traceback."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from test_engine_run import ROOT, SMALL, comparable, lines

from hpt_dsl import checkpoint as ckpt
from hpt_dsl import manifest
from hpt_dsl.faults import RunFault
from hpt_dsl.runfolder import verify

CHECKPOINT_FILES = ["optimizer.json", "optimizer.safetensors", "policy.safetensors", "rng.safetensors",
                    "scheduler.json", "state.json", "manifest.json"]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def cli(*args: str, steps: int = 16, extra_env: dict[str, str] | None = None, plots: bool = False
        ) -> subprocess.CompletedProcess[str]:
    """``hpt-dsl run recipes/hpt.hpt`` with the small settings and ``train.steps = steps``."""
    sets = [f"--set={s}" for s in [*SMALL, f"train.steps={steps}"]]
    return subprocess.run([sys.executable, "-m", "hpt_dsl.cli.main", "run", "recipes/hpt.hpt", *sets, "--quiet",
                           "--plots" if plots else "--no-plots", *args], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, env=env(**(extra_env or {})))  # fmt: skip


def one_clear_error(stderr: str, needle: str) -> None:
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [x for x in stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], stderr[-3000:]


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of 16 steps that nothing disturbs, to compare the broken ones with."""
    out = tmp_path_factory.mktemp("unbroken") / "run"
    proc = cli("-o", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# ----- checkpoints on their own: manifest, fallback, retention, a failing write -------------------


class FileLearner:
    """Writes two files per save, as a learner does."""

    def __init__(self, value: int, fail: BaseException | None = None) -> None:
        self.value, self.fail = value, fail

    def save(self, path: Path) -> None:
        (path / "policy.bin").write_bytes(bytes([self.value % 256]) * 4096)
        if self.fail is not None:
            raise self.fail
        (path / "optimizer.json").write_text(json.dumps({"v": self.value}))


def damage(path: Path, how: str) -> None:
    """Cut ``path`` to half its size, or flip the byte in its middle."""
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:])


@pytest.mark.parametrize("how", ["truncate", "flip"])
@pytest.mark.parametrize("name", ["policy.bin", "optimizer.json", "state.json", "rng.safetensors", "manifest.json"])
def test_every_damaged_file_is_found_and_resume_falls_back(tmp_path: Path, name: str, how: str) -> None:
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, FileLearner(step), {})
    newest = tmp_path / "checkpoints" / "step-000002"
    damage(newest / name, how)
    assert manifest.problems(newest)
    said: list[str] = []
    found = ckpt.resume_point(tmp_path, said.append)
    assert found is not None and found.name == "step-000001"
    assert len(said) == 1 and "step-000002 is damaged" in said[0] and "step-000002.damaged" in said[0]
    assert (tmp_path / "checkpoints" / "step-000002.damaged" / name).exists()  # moved aside, never deleted


def test_no_complete_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    ckpt.save_checkpoint(tmp_path, 1, FileLearner(1), {})
    damage(tmp_path / "checkpoints" / "step-000001" / "policy.bin", "truncate")
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint left"):
        ckpt.resume_point(tmp_path, lambda _: None)
    assert (tmp_path / "checkpoints" / "step-000001.damaged" / "policy.bin").exists()
    assert ckpt.resume_point(tmp_path / "empty", lambda _: None) is None  # nothing at all: start over


def test_retention_keeps_the_newest_complete_ones_and_never_a_damaged_one(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, FileLearner(step), {}, keep=3)
    damage(tmp_path / "checkpoints" / "step-000001" / "policy.bin", "truncate")
    for step in (4, 5):
        ckpt.save_checkpoint(tmp_path, step, FileLearner(step), {}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-000001", "step-000004", "step-000005"]


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("Error while serializing: I/O error: No space left on device")])
def test_a_failing_write_keeps_the_previous_checkpoint_and_says_why(tmp_path: Path, error: BaseException) -> None:
    ckpt.save_checkpoint(tmp_path, 1, FileLearner(1), {})
    with pytest.raises(RunFault) as info:
        ckpt.save_checkpoint(tmp_path, 2, FileLearner(2, fail=error), {}, need=6 << 20)
    text = str(info.value)
    assert "could not write the checkpoint of step 2" in text and str(tmp_path / "checkpoints") in text
    assert "No space left on device" in text and "free there" in text and "needs about 6.0 MB" in text
    assert "step-000001, is intact" in text and f"--resume {tmp_path}" in text
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]


def test_fault_kinds_and_messages(tmp_path: Path) -> None:
    from hpt_dsl.faults import human, is_disk_error, is_lost_peer, lost_peer, space_warning

    gloo = RuntimeError("[/src/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:5: "
                        "Connection reset by peer. This is typically caused by a remote worker hanging.")
    assert is_lost_peer(gloo) and not is_lost_peer(ValueError("reward failed: Connection reset by peer"))
    assert str(lost_peer(gloo, 0, 2, "Then.")) == ("process 0 of 2: another process of this run stopped (Read error "
                                                   "[127.0.0.1]:5: Connection reset by peer); stopping too. Then.")
    assert is_disk_error(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_error(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert not is_disk_error(OSError(errno.ENOENT, "No such file or directory"))
    assert human(6815744) == "6.5 MB" and human(512) == "512 bytes"
    assert space_warning(tmp_path, 1 << 20, 1 << 20) is None  # plenty of room here
    assert "two of them" in (space_warning(tmp_path, 1 << 60, 0) or "")


def test_runs_verify_checks_a_run_folder_without_a_model(tmp_path: Path) -> None:
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, FileLearner(step), {})
    (tmp_path / "run.json").write_text("{}")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2')  # a torn last line is fine

    def verify_cli(*paths: Path) -> subprocess.CompletedProcess[str]:
        code = "import sys; from hpt_dsl.cli.main import main; sys.argv[0] = 'hpt-dsl'; main()"
        proc = subprocess.run([sys.executable, "-c", code, "runs", "verify", *map(str, paths)], capture_output=True,
                              text=True, timeout=120, env=env())
        assert "Traceback" not in proc.stderr and "torch" not in proc.stdout
        return proc

    ok = verify_cli(tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "a resume takes step-000002" in ok.stdout
    damage(tmp_path / "checkpoints" / "step-000002" / "optimizer.json", "flip")
    bad = verify_cli(tmp_path)
    assert bad.returncode == 1 and "DAMAGED" in bad.stdout
    assert "optimizer.json does not match its checksum" in bad.stdout
    assert "takes step-000001" in bad.stdout
    assert verify_cli(tmp_path / "nothing").returncode == 2
    findings, _ = verify(tmp_path)
    assert [f.path.name for f in findings if not f.ok] == ["step-000002"]


SHIM = '''
"""Test shim: writes that fail as a full disk or a killed process makes them fail.
$FAULT_ENOSPC: an OSError(ENOSPC) on the writes whose path contains it, after the first
$FAULT_ENOSPC_AFTER of them. $FAULT_KILL: SIGKILL in the middle of writing the second checkpoint
file of that name (the file is left cut short, as a process killed during the write leaves it)."""
import builtins, errno, io, os, signal

_enospc = os.environ.get("FAULT_ENOSPC", "")
_after = int(os.environ.get("FAULT_ENOSPC_AFTER", "0"))
_kill = os.environ.get("FAULT_KILL", "")
_seen = [0]
_open = builtins.open


def _hit(path):
    path = os.fsdecode(os.fspath(path))
    if _enospc and _enospc in path:
        _seen[0] += 1
        if _seen[0] > _after:
            raise OSError(errno.ENOSPC, "No space left on device", path)
    if _kill and "/.tmp-step-" in path and path.endswith("/" + _kill):
        _seen[0] += 1
        if _seen[0] == 2:
            with _open(path, "wb") as f:
                f.write(b"\\x00" * 100)
                f.flush()
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)


def _checked_open(file, mode="r", *args, **kwargs):
    if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
        _hit(file)
    return _open(file, mode, *args, **kwargs)


builtins.open = io.open = _checked_open
if _enospc or _kill:
    import safetensors.torch as _st

    _save_file = _st.save_file

    def _checked_save_file(tensors, filename, metadata=None):
        _hit(filename)
        return _save_file(tensors, filename, metadata)

    _st.save_file = _checked_save_file
'''


@pytest.fixture
def fault_shim(tmp_path: Path) -> Path:
    folder = tmp_path / "shim"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(SHIM)
    return folder


# ----- kill -9 --------------------------------------------------------------------------------------




@pytest.mark.slow
def test_kill_9_during_every_file_of_a_checkpoint_and_at_random_times(tmp_path: Path, unbroken: Path,
                                                                       fault_shim: Path) -> None:
    """One run killed again and again, each time in the second checkpoint write after it
    (re)started: at each point of the write (before the first file, after the learner's
    files, after the manifest, after the rename), in the middle of each of its files, then
    at random moments. Every --resume continues, and the metrics at the end are the unbroken
    run's."""
    run = tmp_path / "run"
    kills = [{"HPT_DSL_FAULT": f"checkpoint:2:{point}"} for point in ("start", "learner", "manifest", "renamed")]
    kills += [{"PYTHONPATH": str(fault_shim), "FAULT_KILL": name}
              for name in ("policy.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
                           "rng.safetensors", "state.json", ".manifest.json.tmp")]  # fmt: skip
    for i, fault in enumerate(kills):
        proc = cli(*(("-o", str(run)) if i == 0 else ("--resume", str(run))), extra_env=fault)
        assert proc.returncode == -signal.SIGKILL, (fault, proc.stderr[-3000:])
        names = {p.name for p in (run / "checkpoints").iterdir()}
        assert any(n.startswith(".tmp-") for n in names) == (fault.get("HPT_DSL_FAULT") != "checkpoint:2:renamed")
        assert ckpt.resume_point(run, lambda text: pytest.fail(text)) is not None  # the newest one is complete
    rng = random.Random(18)
    for _ in range(2):
        cmd = [sys.executable, "-m", "hpt_dsl.cli.main", "run", "recipes/hpt.hpt",
               *[f"--set={s}" for s in [*SMALL, "train.steps=16"]], "--quiet", "--no-plots", "--resume", str(run)]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(3.0, 8.0))
        proc.kill()
        proc.wait(timeout=60)
    done = cli("--resume", str(run))
    assert done.returncode == 0, done.stderr[-3000:]
    assert comparable(run) == comparable(unbroken)
    assert "Traceback" not in done.stderr


# ----- damaged checkpoint files, then --resume ---------------------------------------------------


@pytest.mark.slow
def test_each_damaged_checkpoint_file_falls_back_and_the_run_ends_as_an_unbroken_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Stop a run after step k (Ctrl-C), truncate or flip the middle byte of one file of its
    newest checkpoint, resume: the damaged checkpoint is named and moved aside, the one before
    it is taken; after every file was damaged once, the metrics are the unbroken run's."""
    from hpt_dsl.train import RunInterrupted, Trainer, run_recipe

    recipe, sets, total = ROOT / "recipes/hpt.hpt", [*SMALL, "train.steps=12"], 12
    whole = run_recipe(recipe, overrides=sets, output=tmp_path / "whole", quiet=True).run_dir
    step_fn, stop_after = Trainer.train_step, [2]

    def ctrl_c_after(self: Trainer, k: int) -> dict[str, Any]:
        row = step_fn(self, k)
        if k + 1 == stop_after[0]:
            os.kill(os.getpid(), signal.SIGINT)  # as if Ctrl-C was pressed during this step
        return row

    monkeypatch.setattr(Trainer, "train_step", ctrl_c_after)
    run = tmp_path / "run"
    with pytest.raises(RunInterrupted):
        run_recipe(recipe, overrides=sets, output=run, quiet=True)
    hows = ["truncate", "flip"] * 4
    for name, how in zip(CHECKPOINT_FILES, hows, strict=False):
        newest = ckpt.latest_checkpoint(run)
        assert newest is not None and newest.name == f"step-{stop_after[0]:06d}"
        damage(newest / name, how)
        capsys.readouterr()
        stop_after[0] += 1
        with pytest.raises(RunInterrupted):
            run_recipe(recipe, overrides=sets, output=run, resume=True, quiet=True)
        said = capsys.readouterr().err
        assert f"checkpoint {newest.name} is damaged" in said and name in said, (name, how, said)
        assert (run / "checkpoints" / f"{newest.name}.damaged" / name).exists()
    assert stop_after[0] < total
    monkeypatch.setattr(Trainer, "train_step", step_fn)
    run_recipe(recipe, overrides=sets, output=run, resume=True, quiet=True)
    assert comparable(run) == comparable(whole)


@pytest.mark.slow
def test_truncated_optimizer_file_then_resume_from_the_command_line(tmp_path: Path, unbroken: Path) -> None:
    """The issue's first row: the newest checkpoint's optimizer.safetensors cut short, then
    --resume: the damage is named, the previous checkpoint taken, the run finishes (exit 0);
    with every checkpoint damaged, one clear error and exit 2."""
    run = tmp_path / "run"
    crashed = cli("-o", str(run), extra_env={"HPT_DSL_FAULT": "checkpoint:4"})  # stops while writing step 4
    assert crashed.returncode == 86, crashed.stderr[-3000:]
    path = run / "checkpoints" / "step-000003" / "optimizer.safetensors"
    os.truncate(path, path.stat().st_size // 3)
    proc = cli("--resume", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint step-000003 is damaged: optimizer.safetensors is" in proc.stderr and "cut short" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (run / "checkpoints" / "step-000003.damaged" / "optimizer.safetensors").exists()
    assert comparable(run) == comparable(unbroken)

    for p in ckpt.list_checkpoints(run):
        damage(p / "policy.safetensors", "flip")
    proc = cli("--resume", str(run))
    assert proc.returncode == 2, proc.stderr[-3000:]
    one_clear_error(proc.stderr, "no complete checkpoint left")


# ----- a full disk ----------------------------------------------------------------------------------



@pytest.mark.slow
@pytest.mark.parametrize(
    ("site", "after", "what"),
    [
        ("run.tmp", 0, "the run folder"),
        ("base-model", 0, "the run's files"),
        ("metrics.jsonl", 3, "the metrics of step 2"),
        (".tmp-step-000002/optimizer.safetensors", 0, "the checkpoint of step 2"),
        (".tmp-step-000002/state.json", 0, "the checkpoint of step 2"),
        (".tmp-step-000002/.manifest.json.tmp", 0, "the checkpoint of step 2"),
        (".tmp-final-model", 0, "the final model"),
        ("plots/", 0, "the figures"),
    ],
)
def test_no_space_left_at_every_write_site(tmp_path: Path, fault_shim: Path, site: str, after: int,
                                           what: str) -> None:
    run = tmp_path / "run"
    proc = cli("-o", str(run), steps=3, plots=site == "plots/",
               extra_env={"PYTHONPATH": str(fault_shim), "FAULT_ENOSPC": site, "FAULT_ENOSPC_AFTER": str(after)})
    assert proc.returncode == 3, proc.stderr[-3000:]
    one_clear_error(proc.stderr, f"could not write {what}")
    assert "No space left on device" in proc.stderr and "free there" in proc.stderr
    found = list((run / "checkpoints").iterdir()) if (run / "checkpoints").exists() else []
    assert not [p for p in found if p.name.startswith(".tmp-")]  # no partial folder
    assert not (run / ".tmp-final-model").exists()
    findings, _ = verify(run) if (run / "run.json").exists() else ([], "")
    assert all(f.ok for f in findings), findings  # what is there is complete
    if site.startswith(".tmp-step-000002"):
        assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-000001"]
        assert "needs about" in proc.stderr and "step-000001, is intact" in proc.stderr
    if site == ".tmp-final-model":
        assert not (run / "final-model").exists()
        again = cli("--resume", str(run), steps=3)  # space freed: the resume writes the final model
        assert again.returncode == 0 and (run / "final-model" / "manifest.json").exists(), again.stderr[-3000:]
    if site == "plots/":
        assert json.loads((run / "run.json").read_text())["completed"] is True


def test_debug_shows_the_traceback_of_a_fault(tmp_path: Path, fault_shim: Path) -> None:
    proc = cli("-o", str(tmp_path / "run"), "--debug", steps=1,
               extra_env={"PYTHONPATH": str(fault_shim), "FAULT_ENOSPC": "run.tmp"})
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" in proc.stderr and "OSError: [Errno 28]" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("error: could not write the run folder")


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint(tmp_path: Path, unbroken: Path) -> None:
    """A 12 MB tmpfs as the run folder: the base model and the first checkpoint fit, the second
    does not. One message with the folder and the space needed, exit 3, the first checkpoint
    intact and the one --resume takes; with more space the resume ends as an unbroken run.
    Needs permission to mount (root); ENOSPC at every write site is the test above."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "12m"):
        pytest.skip("mounting a tmpfs needs root; test_no_space_left_at_every_write_site injects ENOSPC instead")
    try:
        run = disk / "run"
        proc = cli("-o", str(run))
        assert proc.returncode == 3, proc.stderr[-3000:]
        assert "warning:" in proc.stderr and "two of them" in proc.stderr  # the pre-flight check said so
        one_clear_error(proc.stderr, "could not write the checkpoint of step 2")
        assert str(run / "checkpoints") in proc.stderr and "needs about 6." in proc.stderr
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001"]
        assert not manifest.problems(run / "checkpoints" / "step-000001")
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True, timeout=30)
        again = cli("--resume", str(run))
        assert again.returncode == 0, again.stderr[-3000:]
        assert comparable(run) == comparable(unbroken)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)


# ----- a missing DeepSpeed --------------------------------------------------------------------------

NO_DEEPSPEED = '''
import sys


class _NoDeepSpeed:
    """Makes `import deepspeed` fail, as in an environment without it."""

    def find_spec(self, name, path=None, target=None):
        if name == "deepspeed" or name.startswith("deepspeed."):
            raise ImportError("No module named 'deepspeed'", name=name)
        return None


sys.meta_path.insert(0, _NoDeepSpeed())
'''


@pytest.mark.parametrize("world", [1, 2])
def test_a_missing_deepspeed_is_one_line_and_exit_2_before_the_model_loads(tmp_path: Path, world: int) -> None:
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(NO_DEEPSPEED)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"] if world == 2 else [
        sys.executable]
    proc = subprocess.run(
        [*launcher, "-m", "hpt_dsl.cli.main", "run", "recipes/sft.hpt", "--set", "learner.engine=deepspeed",
         "-o", str(tmp_path / "run"), "--quiet"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env(PYTHONPATH=str(shim)),
    )  # fmt: skip
    mine = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert mine and all("needs DeepSpeed" in x and "pip install 'deepspeed" in x for x in mine), proc.stderr[-3000:]
    if world == 1:
        assert len(mine) == 1 and proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    else:  # torchrun ends the other worker and reports the first failure in its own words
        assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "base-model").exists()  # no model was built


def test_the_missing_deepspeed_shim_is_what_makes_it_fail(tmp_path: Path) -> None:
    """Without the shim DeepSpeed imports here: the test above measures the shim, not the machine."""
    proc = subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True, text=True, timeout=300,
                          env=env())
    assert proc.returncode == 0, proc.stderr[-2000:]


# ----- one of two processes killed ------------------------------------------------------------------


def _workers(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the worker processes a torchrun started."""
    found: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid != launcher_pid:
            continue
        for item in environ:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = int(proc.name)
    return found


@pytest.mark.slow
def test_killing_one_of_two_processes_stops_the_other_and_the_run_resumes(tmp_path: Path) -> None:
    """torchrun, two processes, the DeepSpeed learner: kill -9 one worker after a step. The other
    stops within a bounded time with a clear message (no traceback of its own), and the last
    complete checkpoint resumes on two processes."""
    out, logs = tmp_path / "run", tmp_path / "logs"
    sets = [f"--set={s}" for s in [*SMALL, "train.steps=40", "train.eval_every=0", "train.micro_batch=2",
                                    "train.threads=1", "learner.engine=deepspeed"]]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--log-dir", str(logs),
                "--redirects", "3"]
    proc = subprocess.Popen([*launcher, "-m", "hpt_dsl.cli.main", "run", "recipes/hpt.hpt", *sets, "-o", str(out),
                             "--quiet"], cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if ckpt.list_checkpoints(out):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        victim = _workers(proc.pid)[1]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = proc.communicate(timeout=120)
        stopped_in = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and stopped_in < 60, (stopped_in, err[-3000:])
    (rank0_err,) = logs.rglob("0/stderr.log")
    said = rank0_err.read_text()
    assert "Traceback" not in said, said[-3000:]
    assert "another process of this run stopped" in said or "interrupted at step" in said, (said[-3000:], err[-3000:])
    last = ckpt.latest_checkpoint(out)
    assert last is not None and not manifest.problems(last)
    done = int(last.name.split("-")[1])
    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                              "hpt_dsl.cli.main", "run", "recipes/hpt.hpt", *sets, f"--set=train.steps={done + 1}",
                              "--resume", str(out), "--quiet"], capture_output=True, text=True, timeout=600, cwd=ROOT,
                             env=env())  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in lines(out) if r["kind"] == "train"] == list(range(1, done + 2))


FAULTY_REWARD = '''
import os

calls = [0]


def score(response, answer):
    """0/1 on the answer; on the second process, from its seventh answer on, an error."""
    calls[0] += 1
    if os.environ.get("RANK") == "1" and calls[0] > 6:
        raise ConnectionError("the scoring service does not answer")
    return float(answer in response)
'''


@pytest.mark.slow
def test_a_reward_that_fails_in_one_of_two_processes_stops_both(tmp_path: Path) -> None:
    """The reward raises in the second process only: it stops with the reward's error (exit 2),
    the first within a bounded time with the lost-process message (exit 3), neither with a
    traceback."""
    (tmp_path / "faultyreward.py").write_text(FAULTY_REWARD)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {a} + {a}?", "answer": str(2 * a)}) + "\n"
                            for a in range(16)))
    logs = tmp_path / "logs"
    sets = [f"--set={s}" for s in [*SMALL, "train.steps=20", "train.eval_every=0", "train.micro_batch=2",
                                    "train.threads=1", "learner.engine=deepspeed", "data.reward=faultyreward:score",
                                    f"data.train={json.dumps(str(data))}"]]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--log-dir",
                           str(logs), "--redirects", "3", "-m", "hpt_dsl.cli.main", "run", "recipes/grpo.hpt", *sets,
                           "-o", str(tmp_path / "run"), "--quiet"], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, env=env(PYTHONPATH=str(tmp_path)))  # fmt: skip
    assert proc.returncode != 0 and time.monotonic() - started < 400, proc.stderr[-3000:]
    said = {p.parent.name: p.read_text() for p in logs.rglob("stderr.log")}
    assert "Traceback" not in said["0"] + said["1"], said
    one_clear_error(said["1"], "the scoring service does not answer")
    assert "exitcode  : 2" in proc.stderr
    if "error:" in said["0"]:  # unless the launcher ended it first
        one_clear_error(said["0"], "another process of this run stopped")
    assert not (tmp_path / "run" / "final-model").exists()


def test_fault_shims_are_inert_without_their_variables(tmp_path: Path, fault_shim: Path) -> None:
    code = textwrap.dedent("""
        from pathlib import Path
        import sys
        Path(sys.argv[1]).write_text("x")
        print(open(sys.argv[1]).read())
    """)
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "f")], capture_output=True, text=True,
                          timeout=60, env=env(PYTHONPATH=str(fault_shim)))
    assert proc.returncode == 0 and proc.stdout.strip() == "x", proc.stderr
