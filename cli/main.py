"""``hpt-dsl``: the command-line entry point.

Each command lives in its own module of this package and is a few lines over the
library. Heavy imports (torch, transformers) happen inside the commands that need
them, so ``check`` and ``explain`` answer in well under a second.

Exit codes (the same for every command; the table in docs/reliability.md):
    0  success
    1  the recipe has errors (diagnostics were printed); ``runs verify``: something is damaged
    2  usage error or bad input: a missing file, an unknown setting, a bad model path, a
       missing optional package (DeepSpeed, vLLM), no complete checkpoint to resume from
    3  the run stopped on a fault: too many non-finite steps, a write that failed (a full
       disk), another process of the run that stopped; the last complete checkpoint is kept
  130  interrupted (Ctrl-C); a checkpoint was saved first where a run was in progress
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="hpt-dsl",
    help="Post-train language models with estimators written as one line.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


from hpt_dsl.cli.check import check_command  # noqa: E402
from hpt_dsl.cli.diff import diff_command  # noqa: E402
from hpt_dsl.cli.explain import explain_command  # noqa: E402
from hpt_dsl.cli.verify import verify_command  # noqa: E402

app.command("check")(check_command)
app.command("explain")(explain_command)
app.command("verify")(verify_command)
app.command("diff")(diff_command)

from hpt_dsl.cli.compare import compare_command  # noqa: E402
from hpt_dsl.cli.plot import plot_command  # noqa: E402

app.command("compare")(compare_command)
app.command("plot")(plot_command)

from hpt_dsl.cli.run import run_command  # noqa: E402

app.command("run")(run_command)

from hpt_dsl.cli.eval import eval_command  # noqa: E402

app.command("eval")(eval_command)

from hpt_dsl.cli.runs import app as runs_app  # noqa: E402

app.add_typer(runs_app, name="runs")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
