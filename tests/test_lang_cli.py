"""``hpt-dsl check`` and ``hpt-dsl explain``: exit codes, output, JSON, the stock recipes,
and that neither imports torch or transformers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hpt_dsl.cli.main import app
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(str(p) for p in (ROOT / "recipes").glob("*.hpt"))
runner = CliRunner()


def run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def write(tmp_path: Path, text: str | bytes, name: str = "r.hpt") -> str:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def test_every_shipped_recipe_checks_clean() -> None:
    assert len(RECIPES) >= 18
    code, out = run("check", *RECIPES)
    assert code == 0, out
    assert f"checked {len(RECIPES)} files: 0 errors, 0 warnings" in out


EXPECTED = {
    "sft": "sft",
    "reinforce": "reinforce",
    "ppo": "ppo",
    "grpo": "grpo",
    "dr_grpo": "dr_grpo",
    "dapo": "dapo",
    "cispo": "cispo",
    "gspo": "gspo",
    "rloo": "rloo",
    "reinforce_pp": "reinforce_pp",
    "srft": "srft",
    "luffy": "luffy",
    "hpt": "hpt_grpo",
    "hpt_paper": "hpt",
    "hpt_code": "hpt_code",
    "luffy_code": "luffy_code",
    "hpt_gamma_1_8": "hpt",
    "hpt_gamma_2_8": "hpt",
    "sft_then_grpo": "sft_then_grpo",
    "off_on": "hpt_off_on",
    "mix_on": "hpt_mix_on",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_explain_names_the_algorithm(name: str) -> None:
    code, out = run("explain", str(ROOT / "recipes" / f"{name}.hpt"), "--json")
    assert code == 0, out
    assert json.loads(out)["algorithm"] == EXPECTED[name]


def test_explain_prints_components_formula_gate_and_needs() -> None:
    code, out = run("explain", str(ROOT / "recipes" / "hpt_paper.hpt"))
    assert code == 0, out
    assert "algorithm: hpt — Hybrid Post-Training (Lv et al. 2025)" in out
    assert "acc > 0" in out and "otherwise" in out
    assert "estimator 'hpt_rl' — matches hpt_rl" in out and "estimator 'sft' — matches sft" in out
    assert "∇ℓ_t = 𝟙[Â>0 ⇒ r ≤ 1.2; Â<0 ⇒ r ≥ 0.8] · (1/π_old)" in out
    assert "old logprobs" in out and "critic" in out


@pytest.mark.parametrize("name", ["hpt_paper", "hpt_code", "luffy", "luffy_code"])
def test_explain_prints_each_terms_normaliser(name: str) -> None:
    """Which tokens each term sums and what it divides by, in words and as a formula."""
    code, out = run("explain", str(ROOT / "recipes" / f"{name}.hpt"), "--json")
    assert code == 0, out
    rows = {r["term"]: r for r in json.loads(out)["normalisers"]}
    if name == "hpt_paper":
        assert rows["hpt_rl"]["formula"] == "(1/Q) Σ_q (1/N_seqs(rollouts, q)) Σ_i Σ_t"
        assert rows["sft"]["formula"] == "(1/Q) Σ_q (1/N_tokens(demos, q)) Σ_i Σ_t"
        assert "each weighs 1/Q" in rows["sft"]["words"]
    elif name == "luffy":
        for term in ("luffy_on", "luffy_off"):
            assert rows[term]["formula"] == "(1/N_tokens(all)) Σ_i Σ_t"
            assert "one normaliser shared by luffy_on, luffy_off" in rows[term]["words"]
    else:
        rl = "hpt_code_rl" if name == "hpt_code" else "luffy_code_on"
        assert rows[rl]["formula"] == "(1/L) Σ_i Σ_t, L = 32"
        assert rows["bonus_rollouts"]["formula"] == "(1/N_tokens(all)) Σ_i Σ_t"
    code, text = run("explain", str(ROOT / "recipes" / f"{name}.hpt"))
    assert "normalisers" in text


def test_explain_json_lists_needs_and_gate() -> None:
    code, out = run("explain", str(ROOT / "recipes" / "ppo.hpt"), "--json")
    info = json.loads(out)
    assert code == 0 and info["needs"]["critic"] is True and info["gate"] == []
    assert info["estimators"][0]["components"]["adv"] == "gae(1, 0.95)"


def test_check_reports_errors_with_place_caret_and_help(tmp_path: Path) -> None:
    path = write(tmp_path, "# my recipe\nloss = mask=clip(0.2) adv=group_nrom\n")
    code, out = run("check", path)
    assert code == 1
    assert f"{path}:2:27: error[E012]: unknown advantage 'group_nrom'" in out
    assert "2 | loss = mask=clip(0.2) adv=group_nrom" in out
    assert "  |                           ^^^^^^^^^^" in out
    assert "= help: did you mean 'group_norm'?" in out


def test_warnings_fail_only_under_strict(tmp_path: Path) -> None:
    path = write(tmp_path, "loss = mask=clip(0.2) denom=pi_theta adv=reward\n")
    assert run("check", path)[0] == 0
    code, out = run("check", "--strict", path)
    assert code == 1 and "warning[W031]" in out


def test_json_output(tmp_path: Path) -> None:
    bad = write(tmp_path, "loss = grop\n", "bad.hpt")
    code, out = run("check", "--json", bad, RECIPES[0])
    assert code == 1
    data = json.loads(out)
    assert data["errors"] == 1 and [f["ok"] for f in data["files"]] == [False, True]
    (d,) = data["files"][0]["diagnostics"]
    assert {k: d[k] for k in ("severity", "code", "line", "col", "hint")} == {
        "severity": "error",
        "code": "E011",
        "line": 1,
        "col": 8,
        "hint": "did you mean 'grpo'?",
    }


def test_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    code, out = run("check", str(tmp_path / "nope.hpt"))
    assert code == 2 and "error[E007]: no such recipe file" in out
    assert run("explain", str(tmp_path / "nope.hpt"))[0] == 2


def test_bad_override_is_a_usage_error() -> None:
    code, out = run("check", RECIPES[0], "--set", "rollout.nn=4")
    assert code == 2 and "--set:1:9: error[E041]: unknown setting 'nn' in section 'rollout'" in out
    assert run("check", str(ROOT / "recipes" / "hpt.hpt"), "--set", "gamma=0.25")[0] == 0


@pytest.mark.parametrize(
    ("content", "code_", "message"),
    [
        (b"loss = sft\n\xff\xfe garbage\n", "E005", "not UTF-8"),
        (b"\x00\x01\x02binary", "E005", "binary file"),
        (b"", "E006", "defines no loss"),
        (b"\xef\xbb\xbfloss = (sft\n", "E003", "never closed"),
    ],
)
def test_malformed_files_are_recipe_errors(tmp_path: Path, content: bytes, code_: str, message: str) -> None:
    path = write(tmp_path, content)
    code, out = run("check", path)
    assert code == 1, out
    assert f"error[{code_}]" in out and message in out
    assert "Traceback" not in out


def test_non_utf8_position(tmp_path: Path) -> None:
    path = write(tmp_path, b"loss = sft\nrollout { n = 4 } # caf\xe9\n")
    code, out = run("check", "--json", path)
    (d,) = json.loads(out)["files"][0]["diagnostics"]
    assert (code, d["code"], d["line"], d["col"]) == (1, "E005", 2, 24)


def test_explain_of_a_bad_recipe_prints_diagnostics(tmp_path: Path) -> None:
    code, out = run("explain", write(tmp_path, "loss = grpo * sft\n"))
    assert code == 1 and "cannot multiply two losses" in out


def test_check_and_explain_do_not_import_torch_or_transformers() -> None:
    code = (
        "import json, sys\n"
        "from typer.testing import CliRunner\n"
        "from hpt_dsl.cli.main import app\n"
        "r = CliRunner()\n"
        f"a = r.invoke(app, ['check', *{RECIPES!r}]).exit_code\n"
        f"b = r.invoke(app, ['explain', {str(ROOT / 'recipes' / 'luffy.hpt')!r}]).exit_code\n"
        "import hpt_dsl\n"
        "hpt_dsl.load_recipe(text='loss = grpo'); hpt_dsl.check('loss = grpo')\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "print(json.dumps([a, b, heavy]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [0, 0, []]


def test_the_installed_console_script() -> None:
    exe = shutil.which("hpt-dsl")
    assert exe is not None, "the package's console script is not installed"
    done = subprocess.run([exe, "check", *RECIPES], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 errors" in done.stdout


PAPER = sorted(str(p) for p in (ROOT / "recipes" / "paper").glob("*.hpt"))


@pytest.mark.parametrize("path", PAPER, ids=lambda p: Path(p).stem)
def test_the_papers_recipes_check_clean_offline(path: str) -> None:
    """recipes/paper/: every experiment of the HPT paper, clean (no error, no warning) without a
    network or a GPU, each saying how to run it."""
    code, out = run("check", path)
    assert code == 0, out
    assert "warning" not in out, out
    text = Path(path).read_text(encoding="utf-8")
    assert "deepspeed --num_gpus 8" in text and "hpt-dsl eval" in text
    assert any(source in text for source in ("Lv et al. 2025", "Yan et al. 2025", "Fu et al. 2025"))


def test_the_papers_recipes_cover_every_experiment() -> None:
    names = {Path(p).stem for p in PAPER}
    assert {"sft", "grpo", "sft_then_grpo", "luffy", "srft"} <= names
    assert {"hpt_qwen2.5_math_7b", "hpt_qwen2.5_math_1.5b", "hpt_llama3.1_8b"} <= names
