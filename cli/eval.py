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
from pathlib import Path
from typing import Any

import typer
from hpt_dsl.cli.exits import exit_codes
from rich.console import Console
from rich.table import Table


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
    from hpt_dsl.evaluate import NOTE, default_results_path, evaluate_model

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    with exit_codes(console, debug):
        results = evaluate_model(
            model, data, k=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, engine=engine,
            reward=reward, reward_timeout=reward_timeout, max_questions=max_questions, question_key=question_key,
            answer_key=answer_key, system_prompt=system_prompt, prompt_template=prompt_template, dtype=dtype,
            batch=batch, seed=seed, progress=None if as_json else console.print,
        )  # fmt: skip
    path = output or default_results_path(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    if as_json:
        typer.echo(json.dumps(results))
    else:
        Console(highlight=False).print(results_table(results))
        console.print(NOTE)
        console.print(f"results: {path}")


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
