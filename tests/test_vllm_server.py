"""Rollouts from a remote vLLM server (``rollout.engine = "vllm_server"``, hpt_dsl.rollout.server).

The first tests run in every environment: the checker's E046 and a server that is not there
(the client needs no vLLM). The others start vLLM's real OpenAI-compatible server (the CPU
build, loopback only) with hpt-dsl's worker extension, once for the module, in the vLLM
environment (scripts/setup-vllm; CI's vLLM lane):

* the server samples what the in-process engine samples from the same weights and seeds;
* runs of 2 steps against it, on one process and on two (torchrun, DeepSpeed ZeRO-2), end
  with the same weights, and the server holds them;
* the start-up checks (another model, a server without the extension, another protocol) and
  a server lost mid-run (exit 3, the last checkpoint intact).
"""

from __future__ import annotations

import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
from _vllm_runs import train_rows, write_data

from hpt_dsl.models import build_tiny, load_local

ROOT = Path(__file__).resolve().parent.parent
needs_vllm = pytest.mark.skipif(
    find_spec("vllm") is None or find_spec("deepspeed") is None,
    reason="needs vLLM and DeepSpeed: run in the environment made by scripts/setup-vllm",
)
SMALL = ["rollout.engine=vllm_server", "train.questions=4", "rollout.n=2", "rollout.max_new_tokens=12",
         "eval.max_new_tokens=12", "data.max_test=2", "train.micro_batch=2", "train.threads=1", "train.eval_every=0",
         "train.save_every=1", "train.lr=0.003", "data.reward=srv_rewards:parity"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(args: list[str], env: dict[str, str] | None = None, world: int = 1) -> subprocess.CompletedProcess[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world)] if world > 1 else [
        sys.executable]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([*launcher, "-m", "hpt_dsl.cli.main", *args], capture_output=True, text=True, timeout=900,
                          cwd=ROOT, env=env)  # fmt: skip


# ----- in every environment ------------------------------------------------------------------


def test_the_checker_asks_for_the_server_address(tmp_path: Path) -> None:
    recipe = ROOT / "recipes" / "grpo.hpt"
    out = cli(["check", str(recipe), "--set", "rollout.engine=vllm_server"])
    assert out.returncode == 1 and "E046" in out.stdout + out.stderr  # check: 1 = the recipe has errors
    assert 'rollout.server = "host:port"' in out.stdout + out.stderr
    bad = cli(["check", str(recipe), "--set", "rollout.engine=vllm_server", "--set", "rollout.server=nowhere"])
    assert bad.returncode == 1 and "is not a server address" in bad.stdout + bad.stderr
    ok = cli(["check", str(recipe), "--set", "rollout.engine=vllm_server", "--set", "rollout.server=10.0.0.5:8000"])
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_no_server_is_exit_2_with_the_start_command(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    out = cli(["run", str(ROOT / "recipes" / "grpo.hpt"), "--set", "rollout.engine=vllm_server",
               "--set", f"rollout.server=127.0.0.1:{port}", "-o", str(tmp_path / "run"), "--quiet"])  # fmt: skip
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert f"no vLLM server answers at rollout.server = http://127.0.0.1:{port}" in text
    assert "--worker-extension-cls hpt_dsl.rollout.server_ext.WeightSync" in text and "Traceback" not in text


HEALTH = """
import http.server, sys, time
time.sleep(1)  # a server that takes a moment to come up

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


def test_wait_ready_waits_for_health_and_says_why_it_gives_up() -> None:
    from hpt_dsl.rollout.server import wait_ready
    from hpt_dsl.rollout.vllm import RolloutEngineError

    port = free_port()
    up = subprocess.Popen([sys.executable, "-c", HEALTH, str(port)])
    try:
        assert 0.5 < wait_ready(f"127.0.0.1:{port}", up, 60) < 60
    finally:
        up.kill()
        up.wait()
    gone = subprocess.Popen([sys.executable, "-c", "raise SystemExit(4)"])
    with pytest.raises(RolloutEngineError, match="exited with 4 before it answered"):
        wait_ready(f"127.0.0.1:{free_port()}", gone, 60)
    silent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with pytest.raises(RolloutEngineError, match=r"did not answer at 127\.0\.0\.1:\d+ in 3 s"):
            wait_ready(f"127.0.0.1:{free_port()}", silent, 3)
    finally:
        silent.kill()
        silent.wait()


# ----- a real server -------------------------------------------------------------------------


class Server:
    """vLLM's OpenAI-compatible server on the tiny model (seed 0), on the loopback interface."""

    def __init__(self, folder: Path) -> None:
        from hpt_dsl.rollout.server import server_command, wait_ready
        from hpt_dsl.rollout.vllm import RolloutEngineError

        self.model = build_tiny(folder / "tiny", seed=0)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        cmd = server_command(str(self.model), self.port, python=sys.executable)
        cmd += ["--dtype", "float32", "--enforce-eager", "--no-enable-chunked-prefill", "--seed", "0"]
        env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
               "VLLM_CPU_OMP_THREADS_BIND": "nobind", "PYTHONPATH": str(ROOT)}  # fmt: skip
        self.log = open(folder / "server.log", "w")  # noqa: SIM115 - open for the server's lifetime
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            wait_ready(self.address, self.proc, 600)
        except RolloutEngineError as err:
            raise AssertionError(f"{err}\n{(folder / 'server.log').read_text()[-3000:]}") from None

    def stop(self) -> None:
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if find_spec("vllm") is None:
        pytest.skip("needs vLLM: run in the environment made by scripts/setup-vllm")
    srv = Server(tmp_path_factory.mktemp("server"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_data(tmp_path_factory.mktemp("data"), "srv_rewards")


def run_against(server: Server, files: Path, out: Path, world: int = 1, steps: int = 2,
                extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:  # fmt: skip
    sets = [*SMALL, f"rollout.server={server.address}", f"data.train={files / 'train.jsonl'}",
            f"train.steps={steps}", "learner.engine=deepspeed", "learner.zero_stage=2", *extra]  # fmt: skip
    args = ["run", str(ROOT / "recipes" / "grpo.hpt"), *[f"--set={s}" for s in sets], "-o", str(out), "--quiet",
            "--no-plots"]  # fmt: skip
    return cli(args, {"PYTHONPATH": os.pathsep.join([str(files), str(ROOT)])}, world)


@needs_vllm
@pytest.mark.slow
def test_the_server_samples_what_the_in_process_engine_samples(server: Server) -> None:
    """Same weights, prompts and seeds: the same tokens, and log-probs equal to float32 noise."""
    from hpt_dsl.rollout.base import SamplingParams
    from hpt_dsl.rollout.server import make_engine as server_engine
    from hpt_dsl.rollout.vllm import make_engine as local_engine
    from hpt_dsl.settings import Settings

    model, tok = load_local(server.model)
    remote = server_engine(Settings(rollout={"engine": "vllm_server", "server": server.address}), model, tok)
    local = local_engine(Settings(rollout={"engine": "vllm"}), model, tok)
    try:
        prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
        params = SamplingParams(n=3, temperature=1.0, max_new_tokens=10, seed=7, first_prompt=0)
        a, b = remote.generate(prompts, params), local.generate(prompts, params)
    finally:
        local.close()
    assert [r.prompt_index for r in a] == [i for i in range(3) for _ in range(3)]
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.finish_reason for r in a] == [r.finish_reason for r in b]
    gaps = [abs(x - y) for r, s in zip(a, b, strict=True) for x, y in zip(r.logprobs, s.logprobs, strict=True)]
    assert max(gaps) < 1e-4
    assert len({r.token_ids for r in a}) > 3, "seeded samples differ between a prompt's rollouts"


@needs_vllm
@pytest.mark.slow
def test_two_steps_on_one_and_two_processes_end_alike_and_the_server_holds_the_weights(
    server: Server, files: Path, tmp_path: Path
) -> None:
    """2 steps against the server from one process and from two (torchrun, ZeRO-2; the first
    process sends every process's prompts): the same rollouts and the same final weights; the
    server's log-probs of a sampled response are the final model's, not the base model's."""
    import torch
    from safetensors.torch import load_file

    from hpt_dsl.rollout.base import SamplingParams
    from hpt_dsl.rollout.server import ServerRolloutEngine

    one = run_against(server, files, tmp_path / "one")
    assert one.returncode == 0, one.stderr[-4000:]
    two = run_against(server, files, tmp_path / "two", world=2)
    assert two.returncode == 0, two.stderr[-4000:]
    rows_one, rows_two = train_rows(tmp_path / "one"), train_rows(tmp_path / "two")
    assert [r["step"] for r in rows_two] == [1, 2]
    for x, y in zip(rows_one, rows_two, strict=True):
        for key in ("reward/mean", "response_length", "truncated"):  # the same rollouts
            assert y[key] == x[key], key
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4, abs=1e-6)
    a = load_file(tmp_path / "one" / "final-model" / "model.safetensors")
    b = load_file(tmp_path / "two" / "final-model" / "model.safetensors")
    base = load_file(tmp_path / "one" / "base-model" / "model.safetensors")
    assert max(float((a[k] - base[k]).abs().max()) for k in a) > 1e-3, "the runs must move the weights"
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5

    final, tok = load_local(tmp_path / "two" / "final-model")  # the server now holds the last run's weights
    start, _ = load_local(tmp_path / "two" / "base-model")
    engine = ServerRolloutEngine(server.address, config=final.config, stop_token_ids=[])
    engine._in_sync = True  # generate from what the server holds, without sending weights
    prompt = [5, 6, 7, 8]
    (r,) = engine.generate([prompt], SamplingParams(n=1, max_new_tokens=12, seed=3))
    ids = torch.tensor([prompt + list(r.token_ids)])

    def scored(model: Any) -> torch.Tensor:
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0, len(prompt) - 1 : -1].float(), -1)
        return lp.gather(1, ids[0, len(prompt) :, None]).squeeze(1)

    served = torch.tensor(r.logprobs)
    assert float((served - scored(final)).abs().max()) < 1e-4
    assert float((served - scored(start)).abs().max()) > 1e-3


@needs_vllm
def test_start_up_checks_name_the_fix(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another model, a server without the extension (its real answer to a method it lacks),
    another protocol: each is a RolloutEngineError that says what to change."""
    from hpt_dsl.rollout import server as client
    from hpt_dsl.rollout.vllm import RolloutEngineError

    model, _ = load_local(server.model)
    other = model.config.to_dict() | {"hidden_size": 64}
    with pytest.raises(RolloutEngineError, match="serves another model: hidden_size = 128 there, 64 in the policy"):
        client.ServerRolloutEngine(server.address, config=type(model.config)(**other), stop_token_ids=[])
    monkeypatch.setattr(client, "INFO", "hpt_dsl_info_absent")
    with pytest.raises(RolloutEngineError, match="started without hpt-dsl's worker extension"):
        client.ServerRolloutEngine(server.address, config=model.config, stop_token_ids=[])
    monkeypatch.setattr(client, "INFO", "hpt_dsl_info")
    monkeypatch.setattr(client, "PROTOCOL", client.PROTOCOL + 1)
    with pytest.raises(RolloutEngineError, match="install the same hpt-dsl version in the server's environment"):
        client.ServerRolloutEngine(server.address, config=model.config, stop_token_ids=[])


class Cut(socketserver.ThreadingTCPServer):
    """A loopback TCP relay to the server that can be cut, as a server that stops."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, target: int) -> None:
        relay = self

        class Pipe(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                if relay.cut:
                    return
                with socket.create_connection(("127.0.0.1", target)) as up:
                    for src, dst in ((self.request, up), (up, self.request)):
                        threading.Thread(target=_pump, args=(src, dst), daemon=True).start()
                    while not relay.cut and not getattr(self, "done", False):
                        time.sleep(0.05)

        self.cut = False
        super().__init__(("127.0.0.1", 0), Pipe)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.cut = True
        self.shutdown()
        self.server_close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


@needs_vllm
@pytest.mark.slow
def test_a_server_lost_mid_run_is_exit_3_with_the_last_checkpoint_intact(
    server: Server, files: Path, tmp_path: Path
) -> None:
    relay = Cut(server.port)
    srv = type("Via", (), {"address": f"127.0.0.1:{relay.server_address[1]}"})()
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpt_dsl.cli.main", "run", str(ROOT / "recipes" / "grpo.hpt"),
         *[f"--set={s}" for s in (*SMALL, f"rollout.server={srv.address}", f"data.train={files / 'train.jsonl'}",
                                  "train.steps=200")],
         "-o", str(out), "--quiet", "--no-plots"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(files), str(ROOT)])},
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not (out / "checkpoints" / "step-000002").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    relay.stop()
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 3, err[-3000:]
    assert "rollout server" in err and "stopped answering" in err and "--resume" in err
    assert "Traceback" not in err
    verify = cli(["runs", "verify", str(out)])
    assert verify.returncode == 0, verify.stdout + verify.stderr
