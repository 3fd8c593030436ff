"""Data files: every shipped layout, the LUFFY training layout, column mapping and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpt_dsl.data.files import DataError, load_benchmarks, load_questions, load_table
from hpt_dsl.settings import DataSettings

DATA = Path(__file__).resolve().parents[1] / "data"


# (file, rows, question column, answer column, demo column, first answer, every row has a demo)
LAYOUTS = [
    ("eval/math500.jsonl", 50, "problem", "answer", "solution", r"\left( 3, \frac{\pi}{2} \right)", True),
    ("eval/aime24.json", 30, "prompt", "answer", None, "204", False),
    ("eval/aime25.jsonl", 30, "prompt", "answer", None, "70", False),
    ("eval/amc23.jsonl", 40, "problem", "answer", None, "27", False),
    ("eval/minerva_math.jsonl", 20, "problem", "solution", "solution", "1.6", True),
    ("eval/olympiadbench.jsonl", 15, "question", "final_answer", "solution", "2", True),
    ("eval/gsm8k.jsonl", 50, "question", "answer", None, "18", True),
    ("eval/luffy_valid_sample.parquet", 32, "prompt", "reward_model.ground_truth", None, "204", False),
    ("train/gsm8k_train.jsonl", 128, "question", "answer", None, "72", True),
]


@pytest.mark.parametrize("name,rows,q_key,a_key,d_key,first,demos", LAYOUTS)
def test_shipped_layouts_are_detected(
    name: str, rows: int, q_key: str, a_key: str, d_key: str | None, first: str, demos: bool
) -> None:
    table = load_table(str(DATA / name), DataSettings(), "test")
    assert table.columns == {"question": q_key, "answer": a_key, "demo": d_key}
    assert len(table.questions) == rows and table.skipped == {}
    assert table.questions[0].answer == first
    assert [q.id for q in table.questions] == list(range(rows))
    assert all(q.prompt and q.answer for q in table.questions)
    assert all(q.demo for q in table.questions) == demos
    if d_key == "solution" and a_key != "final_answer":  # MATH-style solutions end in the boxed answer
        assert all(rf"\boxed{{{q.answer}}}" in (q.demo or "") for q in table.questions[:5])


def test_luffy_chat_prompt_drops_the_system_message() -> None:
    q = load_questions(str(DATA / "eval/luffy_valid_sample.parquet"), DataSettings(), "test")[0]
    assert q.prompt.startswith("Every morning Aya goes for a $9$-kilometer-long walk")
    assert "systematic, thorough reasoning" not in q.prompt


def test_gsm8k_answer_becomes_a_boxed_demonstration() -> None:
    q = load_questions(str(DATA / "train/gsm8k_train.jsonl"), DataSettings())[0]
    assert q.answer == "72"
    assert q.demo is not None and q.demo.endswith(r"The answer is $\boxed{72}$.")
    assert "<<" not in q.demo and "####" not in q.demo  # calculator annotations and marker removed


def _luffy_rows() -> list[dict]:
    """The LUFFY / HPT training layout, built from real GSM8K rows."""
    rows = []
    for line in (DATA / "train/gsm8k_train.jsonl").read_text().splitlines()[:6]:
        r = json.loads(line)
        worked, answer = r["answer"].split("####")
        rows.append({
            "data_source": "gsm8k",
            "prompt": [
                {"role": "system", "content": "Think first."},
                {"role": "user", "content": r["question"]},
            ],
            "target": [{"role": "assistant", "content": worked + f"\\boxed{{{answer.strip()}}}"}],
            "reward_model": {"ground_truth": answer.strip(), "style": "rule"},
            "extra_info": {"index": len(rows)},
        })
    return rows


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_luffy_training_layout(tmp_path: Path, fmt: str) -> None:
    rows = _luffy_rows()
    path = tmp_path / f"train.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = load_table(str(path), DataSettings())
    assert table.columns == {"question": "prompt", "answer": "reward_model.ground_truth", "demo": "target"}
    q = table.questions[0]
    assert q.prompt == rows[0]["prompt"][1]["content"]
    assert q.answer == "72"
    assert q.demo == rows[0]["target"][0]["content"]


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_explicit_column_mapping(tmp_path: Path) -> None:
    src = _write_jsonl(tmp_path / "x.jsonl", [{"q": "1+1?", "meta": {"gold": 2}, "worked": "1+1=\\boxed{2}"}])
    data = DataSettings(question_key="q", answer_key="meta.gold", demo_key="worked")
    [q] = load_questions(src, data)
    assert (q.prompt, q.answer, q.demo) == ("1+1?", "2", "1+1=\\boxed{2}")


def test_missing_column_lists_the_columns_that_exist(tmp_path: Path) -> None:
    src = _write_jsonl(tmp_path / "x.jsonl", [{"problem": "1+1?", "answer": "2", "meta": {"level": 1}}])
    with pytest.raises(DataError) as e:
        load_questions(src, DataSettings(answer_key="gold"))
    msg = str(e.value)
    assert "no column 'gold'" in msg and "data.answer_key" in msg
    assert "problem, answer, meta, meta.level" in msg


def test_undetectable_question_column(tmp_path: Path) -> None:
    src = _write_jsonl(tmp_path / "x.jsonl", [{"text": "1+1?", "answer": "2"}])
    with pytest.raises(DataError, match=r"which column holds the question.*text, answer.*data.question_key"):
        load_questions(src, DataSettings())


EMPTY = [("e.jsonl", ""), ("e.jsonl", "\n\n"), ("e.json", "[]"), ("e.json", "")]


@pytest.mark.parametrize("name,text", EMPTY)
def test_empty_files_are_a_clear_error(tmp_path: Path, name: str, text: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match="holds no rows"):
        load_questions(str(tmp_path / name), DataSettings())


def test_empty_parquet(tmp_path: Path) -> None:
    pq.write_table(pa.table({"problem": pa.array([], pa.string()), "answer": pa.array([], pa.string())}),
                   tmp_path / "e.parquet")
    with pytest.raises(DataError, match="holds no rows"):
        load_questions(str(tmp_path / "e.parquet"), DataSettings())


def test_rows_without_answer_are_skipped_and_counted(tmp_path: Path) -> None:
    rows = [
        {"problem": "a?", "answer": "1"},
        {"problem": "b?", "answer": None},
        {"problem": "c?", "answer": "   "},
        {"problem": "d?"},
        {"problem": "", "answer": "4"},
        {"problem": "e?", "solution": "no box here, so no answer"},
        {"problem": "f?", "answer": 5.0},
    ]
    table = load_table(_write_jsonl(tmp_path / "x.jsonl", rows), DataSettings())
    assert [(q.prompt, q.answer) for q in table.questions] == [("a?", "1"), ("f?", "5")]
    assert table.skipped == {"no question": 1, "no answer": 4}


def test_file_where_no_row_has_an_answer(tmp_path: Path) -> None:
    src = _write_jsonl(tmp_path / "x.jsonl", [{"problem": "a?", "answer": None}] * 3)
    with pytest.raises(DataError, match="none of its 3 rows has both a question"):
        load_questions(src, DataSettings())


def test_bad_json_line_names_file_line_and_column(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").write_text('{"problem": "a", "answer": "1"}\n{"problem": oops}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:2:13: not valid JSON"):
        load_questions(str(tmp_path / "x.jsonl"), DataSettings())


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_questions(str(tmp_path / "nope.jsonl"), DataSettings())
    (tmp_path / "x.csv").write_text("problem,answer\n")
    with pytest.raises(DataError, match="unknown format"):
        load_questions(str(tmp_path / "x.csv"), DataSettings())
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_questions(str(tmp_path / "bad.parquet"), DataSettings())


def test_max_rows_per_split() -> None:
    data = DataSettings(max_train=5, max_test=3)
    src = str(DATA / "eval/gsm8k.jsonl")
    assert len(load_questions(src, data, "train")) == 5
    assert len(load_questions(src, data, "test")) == 3


def test_benchmarks_split_by_source_and_drop_repeats() -> None:
    groups = load_benchmarks(str(DATA / "eval/luffy_valid_sample.parquet"), DataSettings())
    assert {k: len(v) for k, v in groups.items()} == {"aime": 2, "math": 4, "olympiad_bench": 4, "amc": 1,
                                                      "minerva": 4}
    assert [q.answer for q in groups["aime"]] == ["204", "025"]
    single = load_benchmarks(str(DATA / "eval/aime25.jsonl"), DataSettings())
    assert list(single) == ["aime25"] and len(single["aime25"]) == 30


def test_hf_datasets_saved_folder_and_data_folder(tmp_path: Path) -> None:
    import datasets
    splits = datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"problem": "1+1?", "answer": "2"}]),
        "test": datasets.Dataset.from_list([{"problem": f"{n}+{n}?", "answer": str(2 * n)} for n in (2, 3)]),
    })
    splits.save_to_disk(str(tmp_path / "saved"))
    assert [q.answer for q in load_questions(str(tmp_path / "saved"), DataSettings(), "test")] == ["4", "6"]
    with pytest.raises(DataError, match=r"no split 'validation'; it has \['test', 'train'\]"):
        load_questions(str(tmp_path / "saved"), DataSettings(), "validation")
    (tmp_path / "folder").mkdir()
    splits["train"].to_parquet(str(tmp_path / "folder" / "train.parquet"))
    assert [q.prompt for q in load_questions(str(tmp_path / "folder"), DataSettings())] == ["1+1?"]


def test_hub_dataset_offline_and_not_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="cannot load dataset .*'nobody/no-such-dataset'.*HF_HUB_OFFLINE"):
        load_questions("nobody/no-such-dataset", DataSettings())


def test_gzipped_jsonl_and_json_variants(tmp_path: Path) -> None:
    import gzip

    rows = [{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?", "answer": "4"}]
    with gzip.open(tmp_path / "x.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))  # JSON Lines as .json
    (tmp_path / "wrapped.json").write_text(json.dumps({"version": 1, "data": rows}))
    for name in ("x.jsonl.gz", "lines.json", "wrapped.json"):
        assert [q.answer for q in load_questions(str(tmp_path / name), DataSettings())] == ["2", "4"], name
