"""``hpt-dsl eval MODEL_OR_RUN --data FILE...``: avg@k and pass@k on benchmark files.

MODEL_OR_RUN is a checkpoint folder, a hub name, an alias (``smollm2-135m``) or a run
folder of ``hpt-dsl run`` (its ``final-model/``, prompted as the run's settings say).
Each data file is one benchmark (a file with a ``data_source`` column, such as LUFFY's
validation set, is one benchmark per source). Defaults as in the HPT paper's evaluation:
temperature 0.6, top-p 0.95, the math-verify reward.

Exit codes: 0 done, 2 bad input (a missing model or data file, a bad column, a bad reward).
"""

from __future__ import annotations

import json
import re
import traceback
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

NOTE = "Scores of the model as given on these sets; no checkpoint was selected by them."


def eval_command(
    model: str = typer.Argument(..., metavar="MODEL_OR_RUN", help="checkpoint, hub id, alias or run folder"),
    data: list[str] = typer.Option(..., "--data", "-d", metavar="FILE", help="benchmark file (repeatable)"),
    k: int = typer.Option(1, "--k", "-k", min=1, help="samples per question (avg@k, pass@k)"),
    temperature: float = typer.Option(0.6, "--temperature", min=0.01, help="sampling temperature"),
    top_p: float = typer.Option(0.95, "--top-p", min=0.0, max=1.0, help="nucleus sampling mass"),
    max_new_tokens: int = typer.Option(1024, "--max-new-tokens", min=1, help="response length limit"),
    engine: str = typer.Option("hf", "--engine", help="rollout engine: hf or vllm"),
    reward: str = typer.Option("math_verify", "--reward", help="boxed, math_verify or module:function"),
    reward_timeout: float = typer.Option(5.0, "--reward-timeout", min=0.01, help="seconds per answer"),
    max_questions: int | None = typer.Option(None, "--max-questions", min=1, help="first N per benchmark"),
    question_key: str | None = typer.Option(None, "--question-key", help="question column (default: detect)"),
    answer_key: str | None = typer.Option(None, "--answer-key", help="answer column (default: detect)"),
    system_prompt: str | None = typer.Option(None, "--system-prompt", help="system message before questions"),
    prompt_template: str | None = typer.Option(
        None, "--prompt-template", help="raw prompt with a {question} slot instead of the chat template"
    ),
    dtype: str | None = typer.Option(None, "--dtype", help="float32, bfloat16 or float16"),
    batch: int = typer.Option(64, "--batch", min=1, help="questions per generate call"),
    seed: int = typer.Option(0, "--seed", help="sampling seed"),
    output: Path | None = typer.Option(None, "--output", "-o", help="results JSON (default: see --help)"),
    as_json: bool = typer.Option(False, "--json", help="print the results JSON instead of the table"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Evaluate a model: k samples per question, avg@k and unbiased pass@k per benchmark.

    The results JSON goes to --output (default: RUN/eval.json for a run folder, else eval-MODEL.json).
    """
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    opts = dict(locals())
    try:
        results = _evaluate(opts, console)
    except _bad_input_errors() as e:
        if debug:
            traceback.print_exc()
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    path = output or _default_output(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    if as_json:
        typer.echo(json.dumps(results))
    else:
        Console(highlight=False).print(results_table(results))
        console.print(NOTE)
        console.print(f"results: {path}")


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    from pydantic import ValidationError

    from hpt_dsl import models
    from hpt_dsl.data.files import DataError
    from hpt_dsl.data.verify import RewardError
    from hpt_dsl.rollout.vllm import RolloutEngineError

    return (models.ModelError, DataError, RewardError, RolloutEngineError, ValidationError, FileNotFoundError)


def _run_settings(model: str) -> dict[str, Any] | None:
    """The settings a run folder was trained with (``run.json``), or None for a plain model."""
    run_json = Path(model).expanduser() / "run.json"
    if not run_json.is_file():
        return None
    try:
        return json.loads(run_json.read_text()).get("settings")
    except (OSError, json.JSONDecodeError):
        return None


def _default_output(model: str) -> Path:
    if _run_settings(model) is not None:
        return Path(model) / "eval.json"
    return Path(f"eval-{re.sub(r'[^A-Za-z0-9._-]+', '_', Path(model).name or model)}.json")


def _evaluate(o: dict[str, Any], console: Console) -> dict[str, Any]:
    """Load model, data and reward as the options ``o`` say; evaluate every benchmark."""
    from hpt_dsl import hub
    from hpt_dsl.data.files import load_benchmarks
    from hpt_dsl.data.verify import make_reward
    from hpt_dsl.evaluate import evaluate
    from hpt_dsl.prompting import PromptCache
    from hpt_dsl.rollout.base import SamplingParams, make_rollout_engine
    from hpt_dsl.settings import DataSettings, ModelSettings, RolloutSettings, Settings

    trained = _run_settings(o["model"]) or {}
    model_fields = dict(trained.get("model", {}))
    checkpoint = hub.resolve(o["model"])
    model_fields["name"] = checkpoint
    for key in ("system_prompt", "prompt_template", "dtype"):
        if o[key] is not None:
            model_fields[key] = o[key]
    data_fields = {"reward": "reward", "reward_timeout": "reward_timeout", "max_test": "max_questions",
                   "question_key": "question_key", "answer_key": "answer_key"}
    settings = Settings(
        model=ModelSettings(**model_fields),
        data=DataSettings(**{field: o[opt] for field, opt in data_fields.items()}),
        rollout=RolloutSettings(engine=o["engine"], max_new_tokens=o["max_new_tokens"]),
    )
    benchmarks: dict[str, list[Any]] = {}
    for path in o["data"]:
        for name, questions in load_benchmarks(path, settings.data).items():
            while name in benchmarks:
                name += "'"
            benchmarks[name] = questions
    reward_fn = make_reward(settings.data)
    net, tokenizer = hub.load_pretrained(settings.model)
    rollout = make_rollout_engine(settings, net, tokenizer)
    prompts = PromptCache(tokenizer, settings.model)
    k = o["k"]
    sampling = {key: o[key] for key in ("k", "temperature", "top_p", "max_new_tokens", "seed", "engine")}
    params = SamplingParams(n=k, temperature=o["temperature"], top_p=o["top_p"],
                            max_new_tokens=o["max_new_tokens"], seed=o["seed"])
    out: dict[str, Any] = {}
    try:
        for name, questions in benchmarks.items():
            if not o["as_json"]:
                console.print(f"{name}: {len(questions)} questions x {k} samples ...")
            out[name] = evaluate(rollout, tokenizer, questions, reward_fn, k, params,
                                 encode=lambda q, split=name: prompts.prompt(q, split),
                                 batch_questions=o["batch"])
    finally:
        rollout.close()
        close = getattr(reward_fn, "close", None)
        if callable(close):
            close()
    prompt = settings.model.model_dump(include={"system_prompt", "prompt_template"})
    return {
        "model": o["model"],
        "checkpoint": checkpoint,
        "prompt": prompt,
        "sampling": sampling,
        "reward": o["reward"],
        "note": NOTE,
        "benchmarks": out,
    }


def results_table(results: dict[str, Any]) -> Table:
    """One row per benchmark: questions, avg@k, pass@k, response length, truncation, speed."""
    k = results["sampling"]["k"]
    table = Table(title=f"{results['model']}  (k={k}, temperature {results['sampling']['temperature']}, "
                        f"top-p {results['sampling']['top_p']}, reward {results['reward']})")
    for col in ("benchmark", "questions", f"avg@{k}", *([f"pass@{k}"] if k > 1 else []),
                "tokens/response", "truncated", "tokens/s", "seconds"):
        table.add_column(col, justify="left" if col == "benchmark" else "right")
    for name, r in results["benchmarks"].items():
        table.add_row(
            name, str(r["questions"]), f"{100 * r[f'avg@{k}']:.1f}",
            *([f"{100 * r[f'pass@{k}']:.1f}"] if k > 1 else []),
            f"{r['mean_response_tokens']:.0f}", f"{100 * r['truncated']:.0f}%",
            f"{r['tokens_per_s']:.1f}", f"{r['seconds']:.1f}",
        )
    return table
