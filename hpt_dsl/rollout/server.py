"""Rollouts from a remote vLLM server (``rollout.engine = "vllm_server"``).

For users who put generation on other GPUs or another node. The server is vLLM's own
OpenAI-compatible server, started on the policy's checkpoint with hpt-dsl's worker extension
(``hpt_dsl.rollout.server_ext``, which has the command); ``rollout.server = "host:port"``
names it. The learner's environment needs no vLLM.

Rollouts. The first process gathers every process's prompts (token ids, never text), sends
one ``/v1/completions`` request per sample, ``n = 1`` and the seed
``request_seed(seed, i * n + j)`` for sample j of the step's prompt i, as the in-process
engine seeds them, and gives each process its own prompts' rollouts. The requests go out
together, so the server batches them. The answer's token ids and each sampled token's
log-prob (``logprobs = 0`` under ``--logprobs-mode processed_logprobs``) are the rollout.

Weight sync, after every update and after a resume. Every process walks the learner's
parameters (a ZeRO-3 learner gathers each one for it); the first process packs them into
safetensors chunks of at most ``CHUNK_BYTES`` and sends each through vLLM's
``/collective_rpc`` (base64 in the request, or a file in ``rollout.server_dir`` when the
server shares a file system), asks the server which of its parameters were not written (a
partial sync is refused, and the engine generates nothing until a complete one), and clears
the server's prefix cache, whose keys and values belong to the old weights. Every process
then agrees on the outcome.

Faults. At start-up a missing server, a server without the extension or
``VLLM_SERVER_DEV_MODE``, one on another model or log-prob mode, or one speaking another
protocol is a ``RolloutEngineError`` (exit code 2) naming the setting and the fix. A server
lost mid-run fails the step with ``RunFault`` (exit code 3); the last checkpoint is intact.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpt_dsl import comm
from hpt_dsl.faults import RunFault
from hpt_dsl.rollout.base import Rollout, RolloutEngine, SamplingParams
from hpt_dsl.rollout.protocol import CONFIG_KEYS, EXTENSION, PROTOCOL, server_url
from hpt_dsl.rollout.vllm import RolloutEngineError, finish_reason, request_seed, stop_token_ids

if TYPE_CHECKING:
    from torch import Tensor

    from hpt_dsl.settings import Settings

CHUNK_BYTES = 256 * 2**20
"""Weight-sync chunk: the parameters of one request (or file), at most this many bytes."""
START_HINT = (
    "start it with VLLM_SERVER_DEV_MODE=1 vllm serve CHECKPOINT --worker-extension-cls "
    f"{EXTENSION} --logprobs-mode processed_logprobs --generation-config vllm (docs/vllm.md)"
)


INFO = "hpt_dsl_info"
"""The extension's method the client calls first (a server without the extension lacks it)."""


def server_command(checkpoint: str, port: int, host: str = "127.0.0.1", *, python: str | None = None) -> list[str]:
    """The command that starts vLLM's OpenAI-compatible server for ``rollout.engine = "vllm_server"``
    (run it with ``VLLM_SERVER_DEV_MODE=1`` in the environment). ``python``: start it as that
    interpreter's ``-m vllm.entrypoints.openai.api_server``, the same server, which the CPU build
    needs (its ``vllm serve`` looks for a package named ``vllm``); else ``vllm serve``."""
    head = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint] if python else [
        "vllm", "serve", checkpoint]  # fmt: skip
    return [*head, "--host", host, "--port", str(port), "--worker-extension-cls", EXTENSION,
            "--logprobs-mode", "processed_logprobs", "--generation-config", "vllm"]  # fmt: skip


def wait_ready(address: str, proc: subprocess.Popen[Any], timeout_s: float) -> float:
    """Wait until the server at ``address`` ("host:port"), started as ``proc`` (as
    ``server_command`` gives it), answers ``/health``; returns the seconds it took.
    ``RolloutEngineError`` when the process ends first or ``timeout_s`` passes."""
    started = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RolloutEngineError(f"the vLLM server exited with {proc.returncode} before it answered")
        try:
            with urllib.request.urlopen(f"http://{address}/health", timeout=5):
                return time.monotonic() - started
        except OSError:
            if time.monotonic() - started >= timeout_s:
                raise RolloutEngineError(f"the vLLM server did not answer at {address} in {timeout_s:.0f} s") from None
            time.sleep(2)


class ServerLost(Exception):
    """The server did not answer a request (connection refused or closed, a timeout)."""


def make_engine(settings: Settings, model: Any, tokenizer: Any) -> ServerRolloutEngine:
    """A client of the server at ``rollout.server``, checked against ``model`` and loaded with its
    weights."""
    module = getattr(model, "module", model)
    r = settings.rollout
    if not r.server:  # the checker says so at file:line:col; this is for the Python API
        raise RolloutEngineError('rollout.engine = "vllm_server" needs rollout.server = "host:port"')
    engine = ServerRolloutEngine(
        r.server, config=module.config, stop_token_ids=stop_token_ids(module, tokenizer),
        timeout=r.server_timeout, shared_dir=r.server_dir,
    )  # fmt: skip
    engine.load_weights(module.named_parameters())
    return engine


class ServerRolloutEngine(RolloutEngine):
    """``RolloutEngine`` over a vLLM server; only the first process talks to it."""

    def __init__(
        self,
        address: str,
        *,
        config: Any,
        stop_token_ids: list[int],
        timeout: float = 600.0,
        shared_dir: str | None = None,
    ) -> None:
        self.url = server_url(address)
        self.stop_token_ids = list(stop_token_ids)
        self.timeout = timeout
        self.shared_dir = Path(shared_dir) if shared_dir else None
        self._in_sync = False
        self.served_model = ""
        self.max_model_len = 0
        error = None
        if comm.rank() == 0:
            try:
                self._handshake(config)
            except RolloutEngineError as err:
                error = str(err)
        error, self.served_model, self.max_model_len = comm.broadcast_object(
            (error, self.served_model, self.max_model_len)
        )
        if error is not None:
            raise RolloutEngineError(error)

    @property
    def prompt_seeded(self) -> bool:
        return True

    # ----- start-up -----------------------------------------------------------------------

    def _handshake(self, config: Any) -> None:
        where = f"rollout.server = {self.url}"
        try:
            self._request("GET", "/health", timeout=min(self.timeout, 30))
            models = self._request("GET", "/v1/models", timeout=min(self.timeout, 30))
            info = self._rpc(INFO)
        except ServerLost as err:
            raise RolloutEngineError(f"no vLLM server answers at {where} ({err}); {START_HINT}") from None
        except urllib.error.HTTPError as err:
            raise RolloutEngineError(self._start_error(err, where)) from None
        if info.get("protocol") != PROTOCOL:
            raise RolloutEngineError(
                f"the server at {where} runs hpt-dsl's extension protocol {info.get('protocol')}, this "
                f"hpt-dsl speaks {PROTOCOL}; fix: install the same hpt-dsl version in the server's environment"
            )
        theirs = info.get("config", {})
        for key in CONFIG_KEYS:
            mine = getattr(config, key, None)
            if key in theirs and theirs[key] != mine:
                raise RolloutEngineError(
                    f"the server at {where} serves another model: {key} = {theirs[key]} there, {mine} in the "
                    "policy; fix: start the server on the policy's checkpoint (model.name)"
                )
        if info.get("logprobs_mode") != "processed_logprobs":
            raise RolloutEngineError(
                f"the server at {where} reports log-probs as {info.get('logprobs_mode')!r}, not those of the "
                "distribution it samples; fix: restart it with --logprobs-mode processed_logprobs"
            )
        self.served_model = str(models["data"][0]["id"])
        self.max_model_len = int(info.get("max_model_len") or 0)

    @staticmethod
    def _start_error(err: urllib.error.HTTPError, where: str) -> str:
        body = _body(err)
        if err.code == 404 and "collective_rpc" in (err.url or ""):
            return f"the server at {where} has no /collective_rpc route; fix: start it with VLLM_SERVER_DEV_MODE=1"
        if INFO in body or "attribute" in body.lower():
            return f"the server at {where} was started without hpt-dsl's worker extension; {START_HINT}"
        return f"the server at {where} answered HTTP {err.code}: {body[:300]}"

    # ----- rollouts -----------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        if not self._in_sync:
            raise RolloutEngineError(
                "the server's weights are not a complete copy of the policy (no sync yet, or the last one "
                "failed part-way); call load_weights with every parameter before generating"
            )
        shared = params.first_prompt is not None and comm.world_size() > 1
        if not shared:  # one process's own call (or the evaluation, by the first process)
            return self._generate(prompts, list(range(len(prompts))), params)
        from hpt_dsl.rollout.colocate import gather_prompts

        every, index, mine = gather_prompts(prompts, params.first_prompt or 0, None)
        answer: Any = None
        if comm.rank() == 0:
            try:
                answer = self._generate(every, index, params)
            except (RunFault, RolloutEngineError) as err:
                answer = err
            except Exception as err:  # any other failure: the other processes must hear of it too
                answer = RolloutEngineError(f"rollouts from the server failed: {type(err).__name__}: {err}")
        answer = comm.broadcast_object(answer)
        if isinstance(answer, Exception):
            raise answer
        n = params.n
        return [
            Rollout(r.prompt_index - mine.start, r.token_ids, r.logprobs, r.finish_reason)
            for r in answer[mine.start * n : mine.stop * n]
        ]

    def _generate(self, prompts: list[list[int]], index: list[int], params: SamplingParams) -> list[Rollout]:
        n = params.n
        for i, p in enumerate(prompts):
            if self.max_model_len and len(p) >= self.max_model_len:
                raise RolloutEngineError(
                    f"prompt {i} has {len(p)} tokens but the server's context is {self.max_model_len}; "
                    "restart the server with a larger --max-model-len or shorten the prompts"
                )
        bodies = [self._body(prompts[k // n], params, request_seed(params.seed, index[k // n] * n + k % n))
                  for k in range(len(prompts) * n)]  # fmt: skip
        if not bodies:
            return []
        with ThreadPoolExecutor(max_workers=min(64, len(bodies))) as pool:
            answers = list(pool.map(self._complete, bodies))
        out = []
        for k, (body, choice) in enumerate(zip(bodies, answers, strict=True)):
            if list(choice.get("prompt_token_ids") or body["prompt"]) != body["prompt"]:
                raise RolloutEngineError("the server changed the prompt token ids; the learner would score other ids")
            token_ids = tuple(int(t) for t in choice["token_ids"])
            logprobs = tuple(float(x) for x in (choice.get("logprobs") or {}).get("token_logprobs") or [])
            if len(logprobs) != len(token_ids):
                raise RolloutEngineError(
                    f"the server returned {len(token_ids)} tokens but {len(logprobs)} log-probs; "
                    "fix: restart it with --logprobs-mode processed_logprobs"
                )
            out.append(Rollout(k // n, token_ids, logprobs, finish_reason(choice.get("finish_reason"))))
        return out

    def _body(self, prompt: list[int], params: SamplingParams, seed: int) -> dict[str, Any]:
        knobs: dict[str, Any] = (
            {"temperature": 0.0}
            if params.greedy
            else {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k or -1}
        )
        return {
            "model": self.served_model, "prompt": list(prompt), "n": 1, "max_tokens": params.max_new_tokens,
            "seed": seed, "logprobs": 0, "return_token_ids": True, "stop_token_ids": self.stop_token_ids,
            "skip_special_tokens": False, **knobs,
        }  # fmt: skip

    def _complete(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return dict(self._request("POST", "/v1/completions", body)["choices"][0])
        except ServerLost as err:
            raise self._lost(err) from None
        except urllib.error.HTTPError as err:
            raise RolloutEngineError(
                f"the rollout server refused a request: HTTP {err.code}: {_body(err)[:300]}"
            ) from None

    # ----- weight sync --------------------------------------------------------------------

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Send every parameter (Hugging Face names); all or nothing."""
        self._in_sync = False
        error: Exception | None = None
        main = comm.rank() == 0
        try:
            if main:
                self._rpc("hpt_dsl_begin")
            chunk: dict[str, Any] = {}
            size = 0
            for name, tensor in named_tensors:  # every process walks the stream (ZeRO-3 gathers)
                if not main or error is not None:
                    continue
                t = tensor.detach().to("cpu").contiguous()
                chunk[name.removeprefix("module.")] = t
                size += t.numel() * t.element_size()
                if size >= CHUNK_BYTES:
                    self._send(chunk)
                    chunk, size = {}, 0
            if main:
                if chunk:
                    self._send(chunk)
                missing = self._rpc("hpt_dsl_end")
                if missing:
                    raise RolloutEngineError(
                        f"weight sync incomplete: the server's parameters {missing[:5]} were not sent; "
                        "send every parameter of the policy (model.named_parameters())"
                    )
                self._request("POST", "/reset_prefix_cache")  # its keys/values belong to the old weights
        except ServerLost as err:
            error = self._lost(err)
        except urllib.error.HTTPError as err:
            error = RolloutEngineError(f"weight sync failed: the server answered HTTP {err.code}: {_body(err)[:300]}")
        except (RolloutEngineError, RunFault) as err:
            error = err
        except Exception as err:  # any other failure: the other processes must hear of it too
            error = RolloutEngineError(f"weight sync failed: {type(err).__name__}: {err}")
        error = comm.broadcast_object(error)
        if error is not None:
            raise error
        self._in_sync = True

    def _send(self, chunk: dict[str, Tensor]) -> None:
        from safetensors.torch import save, save_file

        if self.shared_dir is None:
            self._rpc("hpt_dsl_load", base64.b64encode(save(chunk)).decode("ascii"))
            return
        self.shared_dir.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="hpt-dsl-sync-", suffix=".safetensors", dir=self.shared_dir)
        os.close(fd)
        try:
            save_file(chunk, path)
            self._rpc("hpt_dsl_load_file", path)
        finally:
            Path(path).unlink(missing_ok=True)

    # ----- HTTP ---------------------------------------------------------------------------

    def _rpc(self, method: str, *args: str) -> Any:
        """``method`` on every worker of the server; the first worker's answer."""
        out = self._request("POST", "/collective_rpc", {"method": method, "args": list(args)})
        return out["results"][0]

    def _request(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as answer:
                raw = answer.read()
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:  # refused, reset, cut, timed out
            raise ServerLost(str(getattr(err, "reason", err)) or type(err).__name__) from None
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise ServerLost(f"an answer that is not JSON: {raw[:100]!r}") from None

    def _lost(self, err: ServerLost) -> RunFault:
        return RunFault(
            f"the rollout server at {self.url} stopped answering ({err}); this step failed and the last "
            "checkpoint is intact; fix: restart the server, then continue with hpt-dsl run --resume RUN_DIR"
        )


def _body(err: urllib.error.HTTPError) -> str:
    try:
        return err.read().decode(errors="replace")
    except OSError:
        return ""
