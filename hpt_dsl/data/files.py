"""Questions from files: JSONL, JSON, Parquet, and Hugging Face ``datasets``.

``load_questions(source, settings.data, split)`` reads rows and maps three columns
to a ``Question``:

    question  the problem text          data.question_key, else the first present of QUESTION_KEYS
    answer    the reference answer      data.answer_key,   else the first present of ANSWER_KEYS
    demo      a worked demonstration    data.demo_key,     else the first present of DEMO_KEYS (optional)

Keys may be dotted to reach into nested records (``reward_model.ground_truth``). The
auto-detection reads, with no settings at all:

* the LUFFY / HPT training layout: ``prompt`` is a chat (a list of ``{role, content}``
  messages; the question is the last user message, system messages are dropped),
  ``target`` a chat whose assistant message is the demonstration, and the answer in
  ``reward_model.ground_truth``;
* the common evaluation layouts: ``problem`` / ``question`` / ``prompt`` with ``answer``,
  ``final_answer`` or only a ``solution`` (the answer is then its last ``\\boxed{}``);
* GSM8K, whose ``answer`` is a worked solution ending in ``#### N``: the answer is ``N``
  and the demonstration is the solution ending in ``\\boxed{N}`` instead.

Rows without a question or an answer are skipped and counted (``Table.skipped``), never
fatal; a missing column, an unreadable or empty file is a ``DataError`` naming the file,
the columns that exist and the fix.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpt_dsl.data.base import Question
from hpt_dsl.data.verify import last_boxed
from hpt_dsl.errors import InputError
from hpt_dsl.settings import DataSettings

log = logging.getLogger(__name__)

QUESTION_KEYS = ("prompt", "problem", "question", "query", "input", "instruction")
ANSWER_KEYS = ("reward_model.ground_truth", "answer", "final_answer", "ground_truth", "gt", "solution")
DEMO_KEYS = ("target", "demo", "demonstration", "solution", "gt_cot")
SOURCE_KEY = "data_source"  # splits a multi-benchmark file (LUFFY's validation set) into benchmarks

_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz")


class DataError(InputError):
    """Data that cannot be read or mapped; the message names the file and the fix."""


@dataclass
class Table:
    """What a file gave: its questions, the columns used, and how many rows were skipped."""

    where: str
    questions: list[Question]
    columns: dict[str, str | None]
    skipped: dict[str, int] = field(default_factory=dict)
    sources: list[str | None] = field(default_factory=list)


# ── reading rows ───────────────────────────────────────────────────────────────


def read_rows(source: str, split: str = "train") -> list[dict[str, Any]]:
    """All rows of a JSONL / JSON / Parquet file, a saved ``datasets`` folder, or a hub dataset."""
    path = Path(source).expanduser()
    if path.is_file():
        name = path.name.lower()
        if name.endswith(".parquet"):
            return _read_parquet(path)
        if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
            return _read_jsonl(path)
        if name.endswith(".json"):
            return _read_json(path)
        raise DataError(f"data file {source}: unknown format; fix: use one of {', '.join(_FILE_SUFFIXES)}")
    if path.is_dir():
        return _read_datasets(str(path), split, local=True)
    if source.startswith((".", "/", "~")) or source.lower().endswith(_FILE_SUFFIXES) or source.count("/") > 1:
        raise DataError(f"data file {source} does not exist; fix: check the path")
    return _read_datasets(source, split, local=False)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    rows: list[dict[str, Any]] = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}:{e.colno}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines saved with a .json suffix
            return _read_jsonl(path)
        raise DataError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from e
    if isinstance(data, dict):  # {"data": [...]} or a single record
        lists = [v for v in data.values() if isinstance(v, list) and v and isinstance(v[0], dict)]
        data = lists[0] if len(lists) == 1 else [data]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON array of objects (or JSON Lines)")
    return data


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"reading {path} needs pyarrow; fix: pip install pyarrow") from e
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a readable Parquet file ({e})") from e


def _read_datasets(source: str, split: str, local: bool) -> list[dict[str, Any]]:
    """A folder saved with ``save_to_disk``, a folder of data files, or a hub dataset name."""
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"reading '{source}' needs the datasets package; fix: pip install datasets") from e
    try:
        saved = local and any((Path(source) / f).is_file() for f in ("dataset_dict.json", "state.json"))
        if saved:
            loaded = datasets.load_from_disk(source)
        else:
            loaded = datasets.load_dataset(source)
    except Exception as e:  # datasets raises many types: missing, offline, bad files
        what = "folder" if local else "dataset (not a local file, so read as a Hugging Face dataset name)"
        raise DataError(
            f"cannot load {what} '{source}': {_first_line(e)}; fix: give a JSONL / Parquet file, "
            "or a dataset that is in the local Hugging Face cache when HF_HUB_OFFLINE is set"
        ) from e
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            if len(loaded) != 1:
                raise DataError(f"dataset '{source}' has no split '{split}'; it has {sorted(loaded)}")
            split = next(iter(loaded))
        loaded = loaded[split]
    return loaded.to_list()


# ── mapping rows to questions ──────────────────────────────────────────────────


def columns_of(rows: Iterable[dict[str, Any]]) -> list[str]:
    """Column names, with one level of nested records spelt ``outer.inner``."""
    names: dict[str, None] = {}
    for row in rows:
        for k, v in row.items():
            names[k] = None
            if isinstance(v, dict):
                for inner in v:
                    names[f"{k}.{inner}"] = None
    return list(names)


def _get(row: dict[str, Any], key: str) -> Any:
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _pick(present: list[str], explicit: str | None, candidates: tuple[str, ...],
          role: str, setting: str, where: str, required: bool) -> str | None:
    if explicit is not None:
        if explicit not in present:
            raise DataError(
                f"{where}: no column '{explicit}' (data.{setting}); the columns are: {', '.join(present)}; "
                f"fix: set data.{setting} to one of them"
            )
        return explicit
    for key in candidates:
        if key in present:
            return key
    if required:
        raise DataError(
            f"{where}: cannot tell which column holds the {role}; the columns are: {', '.join(present)}; "
            f"fix: set data.{setting} to one of them"
        )
    return None


def _text(value: Any, role: str) -> str | None:
    """A message list's text for ``role`` ('user' takes the last, 'assistant' the first), or plain text."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, list) and value:
        if all(isinstance(m, dict) and "content" in m for m in value):
            picked = [m["content"] for m in value if m.get("role") == role] or [value[-1]["content"]]
            return _text(picked[-1] if role == "user" else picked[0], role)
        return _text(value[0], role)
    if isinstance(value, (int, float)):
        return _number(value)
    return None


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


_GSM8K = re.compile(r"\n####\s*(.+?)\s*$", re.S)
_CALC = re.compile(r"<<[^<>]*>>")


def _answer(value: Any) -> tuple[str | None, str | None]:
    """(answer, demo-from-answer): GSM8K's '#### N' and full solutions' last \\boxed{} are unpacked."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (str, int, float)) for v in value):
        parts = [_text(v, "user") for v in value]
        return (", ".join(p for p in parts if p) or None), None
    text = _text(value, "assistant")
    if text is None:
        return None, None
    gsm = _GSM8K.search(text)
    if gsm:
        answer = gsm.group(1).replace(",", "")
        steps = _CALC.sub("", text[: gsm.start()]).strip()
        return answer, f"{steps}\nThe answer is $\\boxed{{{answer}}}$."
    if "\\boxed" in text or "\\fbox" in text:
        boxed = last_boxed(text)
        squeezed = re.sub(r"[\s$.]", "", text)  # a bare "$\boxed{204}$" is an answer, not a demonstration
        bare = boxed is not None and squeezed in (f"\\boxed{{{boxed}}}", f"\\fbox{{{boxed}}}")
        return boxed, None if bare else text
    return text, None


def load_table(source: str, data: DataSettings, split: str = "train") -> Table:
    """Read ``source`` and map its rows to questions (see the module docstring)."""
    rows = read_rows(source, split)
    if not rows:
        raise DataError(f"data '{source}' holds no rows; fix: check the file is the one you meant")
    present = columns_of(rows[:100])
    q_key = _pick(present, data.question_key, QUESTION_KEYS, "question", "question_key", source, True)
    a_key = _pick(present, data.answer_key, ANSWER_KEYS, "answer", "answer_key", source, True)
    d_key = _pick(present, data.demo_key, DEMO_KEYS, "demonstration", "demo_key", source, False)
    if d_key == q_key:
        d_key = None
    skipped = {"no question": 0, "no answer": 0}
    questions: list[Question] = []
    sources: list[str | None] = []
    for row in rows:
        prompt = _text(_get(row, q_key), "user")  # type: ignore[arg-type]
        answer, answer_demo = _answer(_get(row, a_key))  # type: ignore[arg-type]
        if prompt is None:
            skipped["no question"] += 1
            continue
        if answer is None:
            skipped["no answer"] += 1
            continue
        demo = _text(_get(row, d_key), "assistant") if d_key else None
        if d_key == a_key or (demo is None and answer_demo is not None):
            demo = answer_demo
        questions.append(Question(id=len(questions), prompt=prompt, answer=answer, demo=demo))
        source_name = _get(row, SOURCE_KEY)
        sources.append(str(source_name) if source_name is not None else None)
    if not questions:
        raise DataError(
            f"data '{source}': none of its {len(rows)} rows has both a question ('{q_key}') and an answer "
            f"('{a_key}'); fix: set data.question_key / data.answer_key (columns: {', '.join(present)})"
        )
    skipped = {k: v for k, v in skipped.items() if v}
    if skipped:
        log.warning("%s: skipped %s", source, ", ".join(f"{v} rows with {k}" for k, v in skipped.items()))
    columns = {"question": q_key, "answer": a_key, "demo": d_key}
    return Table(where=source, questions=questions, columns=columns, skipped=skipped, sources=sources)


def load_questions(path_or_name: str, data: DataSettings, split: str = "train") -> list[Question]:
    """Questions of one file or dataset, cut to ``data.max_train`` / ``data.max_test`` rows."""
    questions = load_table(path_or_name, data, split).questions
    limit = data.max_train if split == "train" else data.max_test
    return questions[:limit] if limit else questions


def load_benchmarks(path_or_name: str, data: DataSettings, split: str = "test") -> dict[str, list[Question]]:
    """Evaluation sets of one file: one per ``data_source`` value (else one, named by the file).

    Repeated rows (LUFFY's validation set repeats AIME 8 times for avg@8) are kept once,
    since the evaluation draws k samples per question itself.
    """
    table = load_table(path_or_name, data, split)
    stem = Path(path_or_name).name.split(".")[0] or path_or_name
    groups: dict[str, list[Question]] = {}
    seen: set[tuple[str, str, str]] = set()
    for q, src in zip(table.questions, table.sources, strict=True):
        name = src or stem
        if (name, q.prompt, q.answer) in seen:
            continue
        seen.add((name, q.prompt, q.answer))
        group = groups.setdefault(name, [])
        group.append(Question(id=len(group), prompt=q.prompt, answer=q.answer, demo=q.demo))
    if data.max_test:
        groups = {k: v[: data.max_test] for k, v in groups.items()}
    return groups


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
