"""Plugins named in the recipe, ``hpt-dsl verify`` and ``hpt-dsl diff``.

A plugin is a real Python file beside the recipe; nothing of the project changes. The
checker reads its declarations without importing it (a subprocess shows torch stays
unimported), compile/run import it, verify proves its components and catches planted bugs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hpt_dsl.cli.main import app
from typer.testing import CliRunner

from hpt_dsl import load_recipe
from hpt_dsl.estimator import compile_recipe
from hpt_dsl.lang import RecipeError
from hpt_dsl.train import run_recipe
from hpt_dsl.verify import verify

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples"
HEAD = "import torch\nfrom hpt_dsl.plugin import component\n\n"


def plugin(tmp_path: Path, body: str, recipe: str, name: str = "mine.py") -> Path:
    (tmp_path / name).write_text(HEAD + textwrap.dedent(body), encoding="utf-8")
    path = tmp_path / "r.hpt"
    path.write_text(recipe, encoding="utf-8")
    return path


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_the_readme_plugin_checks_verifies_compiles_and_trains(tmp_path: Path) -> None:
    """use "my_components.py" + adv=sign: check, verify, compile and a 5-step run of the built-in task."""
    for f in ("my_components.py", "sign.hpt", "trust.hpt"):
        shutil.copy(EXAMPLES / f, tmp_path / f)
    for recipe in ("sign.hpt", "trust.hpt"):
        code, out = cli("check", str(tmp_path / recipe))
        assert code == 0 and "loads plugin my_components.py (adv=sign, mask=trust)" in out, out
        code, out = cli("verify", str(tmp_path / recipe))
        assert code == 0 and "every property holds" in out, out
    r = load_recipe(tmp_path / "trust.hpt")
    program = compile_recipe(r)
    assert [t.spec.adv.name for t in program.terms] == ["sign", "const"]
    result = run_recipe(tmp_path / "trust.hpt", output=tmp_path / "run", quiet=True, overrides=[
        "train.steps=5", "train.questions=4", "rollout.n=2", "rollout.max_new_tokens=12", "train.eval_every=0",
        "train.save_every=0", "data.max_test=4", "eval.max_new_tokens=8"])  # fmt: skip
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in rows if x["kind"] == "train"]
    assert len(train) == 5 and all("loss/mine" in x for x in train)


def test_check_never_imports_the_plugin_nor_torch(tmp_path: Path) -> None:
    path = plugin(tmp_path, """
        raise RuntimeError("the checker must not run me")

        @component("adv", "mine", meaning="R itself")
        def mine(inp):
            return inp.rewards
    """, 'use "mine.py"\nloss = grpo adv=mine\n')
    code = (
        "import sys; from hpt_dsl import check; d = check(sys.argv[1]); "
        "assert not [x for x in d if x.is_error], d; assert 'torch' not in sys.modules; print('clean')"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr
    with pytest.raises(ValueError, match="failed to import: RuntimeError: the checker must not run me"):
        compile_recipe(load_recipe(path))


@pytest.mark.parametrize(
    ("body", "recipe", "message"),
    [
        ("", 'use "absent.py"\nloss = grpo\n', "plugin file 'absent.py' not found"),
        ("", 'use "no_such_module_xyz"\nloss = grpo\n', "plugin module 'no_such_module_xyz' not found"),
        ("def f(:\n", 'use "mine.py"\nloss = grpo\n', "has a syntax error at line"),
        ("X = 0.3\n@component('adv', 'a', meaning=str(X))\ndef a(inp):\n    return inp.rewards\n",
         'use "mine.py"\nloss = grpo adv=a\n', "must be literals"),
        ("@component('mask', 'm', ranges={'eps': (0, 1)})\ndef m(t, lik, shape, lo):\n    return lik.x, None\n",
         'use "mine.py"\nloss = grpo mask=m(0.1)\n', "ranges names the parameter 'eps', which the function does"),
        ("@component('mask', 'm')\ndef m(t, lik):\n    return lik.x, None\n",
         'use "mine.py"\nloss = grpo mask=m\n', "a mask function takes 3 leading argument"),
        ("@component('adv', 'group_norm')\ndef g(inp):\n    return inp.rewards\n",
         'use "mine.py"\nloss = grpo\n', "a built-in name"),
    ],
)
def test_plugin_errors_are_located_diagnostics(tmp_path: Path, body: str, recipe: str, message: str) -> None:
    path = plugin(tmp_path, body, recipe)
    code, out = cli("check", str(path))
    assert code == 1 and "error[E050]" in out and message in out, out
    assert "r.hpt:1:1" in out and "Traceback" not in out


def test_a_plugin_component_that_raises_names_itself(tmp_path: Path) -> None:
    path = plugin(tmp_path, """
        @component("adv", "boom")
        def boom(inp):
            raise KeyError("rewards")
    """, 'use "mine.py"\nloss = grpo adv=boom\n')
    results = verify(load_recipe(path))
    failed = [r for r in results if r.ok is False]
    assert failed and all("adv=boom (plugin 'mine.py', function boom) raised KeyError" in r.note for r in failed)
    code, out = cli("verify", str(path))
    assert code == 1 and "Traceback" not in out


def test_a_parameter_range_is_checked_like_a_built_in(tmp_path: Path) -> None:
    path = plugin(tmp_path, """
        @component("mask", "trust", ranges={"eps": (0, 1)}, needs=("old_logprobs",))
        def trust(t, lik, shape, eps):
            return shape(lik.x) * t.adv, None
    """, 'use "mine.py"\nloss = grpo mask=trust(1.5)\n')
    with pytest.raises(RecipeError, match=r"trust: eps = 1.5 is out of range: must be in \(0, 1\)"):
        load_recipe(path)


def test_every_kind_a_plugin_can_add(tmp_path: Path) -> None:
    """mask, denom, adv, grad, agg, kl, a per-question statistic in a gate, and a reward."""
    path = plugin(tmp_path, """
        from hpt_dsl.estimator.denom import Likelihood

        @component("denom", "half_old", needs=("old_logprobs",))
        def half_old(t):
            r = torch.exp(0.5 * (t.lp - t.old))
            return Likelihood(r, r.detach())

        @component("grad", "cube")
        def cube():
            return lambda x: x ** 3

        @component("agg", "per_row", weights="rows")
        def per_row(length, n_tok, n_seq):
            return torch.ones_like(length) / n_seq.clamp(min=1)

        @component("kl", "abs")
        def abs_kl(d):
            return d.abs()

        @component("stat", "spread", meaning="max - min reward of the rollouts")
        def spread(rewards, group, n_groups, rollout):
            lo = torch.full((n_groups,), float("inf"), dtype=rewards.dtype).scatter_reduce(
                0, group[rollout], rewards[rollout], "amin")
            hi = torch.full((n_groups,), -float("inf"), dtype=rewards.dtype).scatter_reduce(
                0, group[rollout], rewards[rollout], "amax")
            return torch.where(torch.isfinite(hi - lo), hi - lo, 0.0)

        @component("reward", "length_bonus")
        def length_bonus(response, answer):
            return float(answer in response)
    """, 'use "mine.py"\nlet e = mask=none denom=half_old adv=group_mean grad=cube agg=per_row kl=abs(0.1)\n'
         'loss = if spread > 0 then e else sft\ndata.reward = "length_bonus"\n')
    r = load_recipe(path)
    assert r.needs.old_logprobs and r.needs.ref_model
    assert r.settings.data.reward.endswith("mine.py:length_bonus")
    from hpt_dsl.data.verify import resolve

    assert resolve(r.settings.data.reward)("the answer is 4", "4") == 1.0
    program = compile_recipe(r)
    B, T = 6, 3
    out = program(
        logprobs=-torch.rand(B, T, dtype=torch.float64), old_logprobs=-torch.rand(B, T, dtype=torch.float64),
        ref_logprobs=-torch.rand(B, T, dtype=torch.float64), response_mask=torch.ones(B, T, dtype=torch.bool),
        rewards=torch.tensor([1.0, 0, 0, 0, 0, 1], dtype=torch.float64), group_ids=torch.tensor([0, 0, 1, 1, 1, 1]),
        is_demo=torch.tensor([False, False, False, False, False, True]),
    )  # fmt: skip
    assert torch.isfinite(out.loss) and float(out.metrics["gate/e"]) == pytest.approx(0.5)  # q0 spreads, q1 does not
    assert all(x.ok is not False for x in verify(r)), [x for x in verify(r) if x.ok is False]


# ----- verify catches planted bugs ------------------------------------------------------------------

PLANTED = {
    "split": ("""
        @component("adv", "batch_z", meaning="standardised over the rows it is given")
        def batch_z(inp):
            r = inp.rewards
            return (r - r.mean()) / (r.std() + 1e-6)
    """, "grpo adv=batch_z"),
    "finite": ("""
        @component("adv", "z", meaning="standardised in the group, no epsilon")
        def z(inp):
            from hpt_dsl.estimator.adv import group_stats
            n, mu, sigma = group_stats(inp)
            return (inp.rewards - mu) / sigma
    """, "grpo adv=z"),
    "upge": ("""
        @component("mask", "half", upge=True, meaning="claims to be a stable mask")
        def half(t, lik, shape):
            return 0.5 * shape(lik.x) * t.adv, None
    """, "grpo mask=half"),
    "normalised": ("""
        @component("agg", "row_mean", weights="tokens", meaning="claims token weights that sum to 1")
        def row_mean(length, n_tok, n_seq):
            return 1.0 / length.clamp(min=1)
    """, "grpo agg=row_mean"),
}


@pytest.mark.parametrize("prop", sorted(PLANTED))
def test_verify_catches_a_planted_bug(tmp_path: Path, prop: str) -> None:
    body, estimator = PLANTED[prop]
    path = plugin(tmp_path, body, f'use "mine.py"\nloss = {estimator}\n')
    results = verify(load_recipe(path))
    bad = {r.prop for r in results if r.ok is False}
    assert bad == {prop}, results
    code, out = cli("verify", str(path), "--json")
    info = json.loads(out)
    assert code == 1 and not info["ok"]
    assert any(r["property"] == prop and r["ok"] is False for r in info["results"])


STOCK = sorted(str(p) for p in (ROOT / "recipes").glob("**/*.hpt"))


@pytest.mark.parametrize("path", STOCK, ids=lambda p: str(Path(p).relative_to(ROOT / "recipes")))
def test_verify_passes_for_every_stock_recipe(path: str) -> None:
    results = verify(load_recipe(path))
    assert results and not [r for r in results if r.ok is False]
    assert {r.prop for r in results if r.ok} >= {"upge", "split", "finite"}


def test_verify_prints_one_table_and_exit_codes(tmp_path: Path) -> None:
    code, out = cli("verify", str(ROOT / "recipes" / "luffy.hpt"))
    assert code == 0, out
    for word in ("property", "luffy_on", "luffy_off", "upge", "split", "finite", "silent", "normalised", "✓"):
        assert word in out
    code, out = cli("verify", str(tmp_path / "missing.hpt"))
    assert code == 2


# ----- diff ------------------------------------------------------------------------------------------


def test_diff_shows_the_std_division_and_the_aggregation() -> None:
    code, out = cli("diff", str(ROOT / "recipes" / "grpo.hpt"), str(ROOT / "recipes" / "dr_grpo.hpt"), "--json")
    assert code == 0
    info = json.loads(out)
    (pair,) = info["estimators"]
    differs = {r["key"]: (r["a"], r["b"]) for r in pair["rows"] if r["differs"]}
    assert differs["adv"] == ("group_norm", "group_mean") and differs["agg"][0] == "seq_mean_token_mean"
    assert "/std_G R" in differs["gradient"][0] and "/std_G R" not in differs["gradient"][1]
    assert set(differs) == {"adv", "agg", "gradient", "aggregate", "normaliser"}
    assert info["settings"] == []


def test_diff_of_hpt_and_its_released_form_and_of_settings() -> None:
    code, out = cli("diff", str(ROOT / "recipes" / "hpt_paper.hpt"), str(ROOT / "recipes" / "hpt_code.hpt"), "--json")
    info = json.loads(out)
    assert code == 0 and info["algorithm"] == ["hpt", "hpt_code"]
    names = [(p["a"], p["b"]) for p in info["estimators"]]
    assert ("sft", "sft") in names and ("hpt_rl", "hpt_code_rl") in names
    code, out = cli("diff", str(ROOT / "recipes" / "grpo.hpt"), str(ROOT / "recipes" / "paper" / "grpo.hpt"))
    assert code == 0 and "settings that differ" in out and "train.lr" in out and "≠ entropy" in out


def test_a_run_with_a_broken_plugin_says_so_in_one_line(tmp_path: Path) -> None:
    """A plugin that fails to import: exit 2 before training; a component that raises during a
    step: exit 3 (a run fault); one line each, no traceback."""
    (tmp_path / "broken.py").write_text(HEAD + "raise ImportError('no such thing')\n\n@component('adv', 'x')\n"
                                        "def x(inp):\n    return inp.rewards\n", encoding="utf-8")  # fmt: skip
    (tmp_path / "boom.py").write_text(HEAD + "@component('adv', 'boom')\ndef boom(inp):\n"
                                      "    raise KeyError('rewards')\n", encoding="utf-8")  # fmt: skip
    (tmp_path / "broken.hpt").write_text('use "broken.py"\nloss = grpo adv=x\n', encoding="utf-8")
    (tmp_path / "boom.hpt").write_text('use "boom.py"\nloss = grpo adv=boom\n', encoding="utf-8")
    for name, code, needle in (("broken", 2, "plugin 'broken.py' failed to import: ImportError: no such thing"),
                               ("boom", 3, "adv=boom (plugin 'boom.py', function boom) raised KeyError")):
        out = subprocess.run(
            [sys.executable, "-m", "hpt_dsl.cli.main", "run", f"{name}.hpt", "--set", "train.steps=1",
             "--set", "train.questions=2", "--set", "train.eval_every=0", "-o", str(tmp_path / name), "--quiet"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )  # fmt: skip
        assert out.returncode == code and needle in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
