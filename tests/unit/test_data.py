"""Data loading: every format through fsspec, both column layouts, stable ids, and errors that name the culprit."""

import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spin_ray.config import DataConfig
from spin_ray.data.records import DataError, load_records, record_id

ROWS = [
    {"prompt": "What is 2+2?", "response": "4"},
    {"prompt": "Name a colour.", "response": "Blue."},
    {"prompt": "Say hi.", "response": "Hi!"},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_builtin_gsm8k_has_all_rows_and_unique_ids():
    train, report = load_records("gsm8k")
    assert train.num_rows == 7473 and report.rows_read == 7473 and report.skipped == 0
    assert len(set(train.column("prompt_id").to_pylist())) == 7473
    first = train.slice(0, 1).to_pylist()[0]
    assert first["prompt"] == [{"role": "user", "content": first["prompt"][0]["content"]}]
    assert first["prompt"][0]["content"].startswith("Natalia sold clips")
    assert first["response"].endswith("#### 72")
    test, _ = load_records("gsm8k:test")
    assert test.num_rows == 1319


def test_ids_are_content_hashes_stable_across_sources(tmp_path):
    table, _ = load_records(_write_jsonl(tmp_path / "a.jsonl", ROWS))
    again, _ = load_records(_write_jsonl(tmp_path / "b.jsonl", ROWS))
    assert table.column("prompt_id").to_pylist() == again.column("prompt_id").to_pylist()
    assert table.column("prompt_id")[0].as_py() == record_id([{"role": "user", "content": "What is 2+2?"}], "4")


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "hf", "memory"])
def test_every_format_gives_the_same_records(tmp_path, fmt):
    expected, _ = load_records(_write_jsonl(tmp_path / "ref.jsonl", ROWS))
    if fmt == "jsonl":
        source = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    elif fmt == "json":
        source = str(tmp_path / "d.json")
        (tmp_path / "d.json").write_text(json.dumps(ROWS))
    elif fmt == "parquet":
        source = str(tmp_path / "d.parquet")
        pq.write_table(pa.Table.from_pylist(ROWS), source)
    elif fmt == "hf":
        import datasets

        source = str(tmp_path / "saved")
        datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(source)
    else:
        source = f"memory://spin-ray-test-{tmp_path.name}/d.jsonl"
        with fsspec.open(source, "w") as handle:
            handle.write("".join(json.dumps(r) + "\n" for r in ROWS))
    table, report = load_records(source)
    assert report.records == 3
    assert table.column("prompt_id").to_pylist() == expected.column("prompt_id").to_pylist()


def test_file_url_and_compressed_jsonl(tmp_path):
    import gzip

    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in ROWS))
    table, _ = load_records(f"file://{path}")
    assert table.num_rows == 3


def test_chat_messages_layout_and_system_prompt(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
            ]
        },
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    ]
    table, _ = load_records(_write_jsonl(tmp_path / "chat.jsonl", rows), DataConfig(system_prompt="You help."))
    records = table.to_pylist()
    assert records[0]["prompt"] == rows[0]["messages"][:2]  # own system message kept
    assert records[0]["response"] == "4"
    assert records[1]["prompt"][0] == {"role": "system", "content": "You help."}


def test_custom_column_mapping(tmp_path):
    rows = [{"question": "q1", "answer": "a1"}]
    table, _ = load_records(
        _write_jsonl(tmp_path / "qa.jsonl", rows), DataConfig(prompt_column="question", response_column="answer")
    )
    assert table.to_pylist()[0]["response"] == "a1"


BAD_ROWS = [
    ('{"prompt": "ok", "response": "fine"}\n{"prompt": "broken", \n', "row 2", None, "malformed JSON"),
    ('{"prompt": "ok", "response": "fine"}\n{"prompt": "no answer"}\n', "row 2", "response", "missing"),
    ('{"prompt": "q", "response": "   "}\n', "row 1", "response", "is empty"),
    ('{"prompt": 17, "response": "a"}\n', "row 1", "prompt", "expected a string, got int"),
    (
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ["x"]}]}\n',
        "row 1",
        "messages[1].content",
        "expected a string, got list",
    ),
    (
        '{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "x"}]}\n',
        "row 1",
        "messages[1].role",
        "the last message must be the assistant's",
    ),
    ('[1, 2]\n', "row 1", None, "expected a JSON object, got list"),
    (b'{"prompt": "q", "response": "\xff\xfe"}\n', "row 1", None, "not valid UTF-8"),
]


@pytest.mark.parametrize("content, row, field, reason", BAD_ROWS)
def test_bad_rows_name_file_row_and_field(tmp_path, content, row, field, reason):
    path = tmp_path / "bad.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(DataError) as err:
        load_records(str(path))
    message = str(err.value)
    assert str(path) in message and row in message and reason in message
    if field:
        assert f"field {field!r}" in message


def test_skip_invalid_counts_and_reports(tmp_path):
    lines = [json.dumps(ROWS[0]), "{not json", json.dumps({"prompt": "x", "response": ""}), json.dumps(ROWS[1])]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    table, report = load_records(str(path), DataConfig(skip_invalid=True))
    assert table.num_rows == 2
    assert report.skipped == 2 and report.rows_read == 4
    assert "row 2" in report.skip_examples[0] and "row 3" in report.skip_examples[1]
    assert "2 invalid rows skipped" in report.summary()


def test_duplicates_are_dropped_and_counted(tmp_path):
    table, report = load_records(_write_jsonl(tmp_path / "dup.jsonl", [ROWS[0], ROWS[1], ROWS[0]]))
    assert table.num_rows == 2 and report.duplicates == 1
    assert table.column("source_row").to_pylist() == [1, 2]


def test_limit_and_empty_and_missing_sources(tmp_path):
    table, _ = load_records(_write_jsonl(tmp_path / "d.jsonl", ROWS), DataConfig(limit=2))
    assert table.num_rows == 2
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no usable records"):
        load_records(str(tmp_path / "empty.jsonl"))
    with pytest.raises(DataError, match="no such file"):
        load_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="set data.format"):
        load_records(str(tmp_path / "d.csv"))


def test_unreadable_parquet_is_named(tmp_path):
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match="unreadable parquet") as err:
        load_records(str(path))
    assert str(path) in str(err.value)


def test_multi_turn_conversations_load_as_ultrachat_has_them(tmp_path, chat):
    """A row's prompt is every turn before its last assistant turn, which is the human answer; a templated prompt over
    data.max_prompt_tokens is dropped and counted (overlong: drop), or keeps its end (truncate)."""
    from spin_ray.config import load_config
    from spin_ray.data.prepare import tokenize_split

    turns = [{"role": "user", "content": "What is a prime number?"},
             {"role": "assistant", "content": "A number with exactly two divisors."},
             {"role": "user", "content": "Is 9 one?"},
             {"role": "assistant", "content": "No: 9 = 3 x 3."}]
    long_turns = [{"role": "user", "content": "Tell me about rivers. " * 60},
                  {"role": "assistant", "content": "Rivers flow."}, {"role": "user", "content": "And lakes?"},
                  {"role": "assistant", "content": "Lakes stay."}]
    path = tmp_path / "ultrachat.jsonl"
    path.write_text("".join(json.dumps({"prompt": t[0]["content"], "prompt_id": str(i), "messages": t}) + "\n"
                            for i, t in enumerate([turns, long_turns])))
    config = load_config(None, [f"data.train={path}", "data.max_prompt_tokens=128"])
    split = tokenize_split(str(path), config, chat)
    assert split.lengths.pairs == 2 and split.lengths.dropped == 1 and split.lengths.kept == 1
    assert split.records.column("prompt").to_pylist()[0] == turns[:3]
    assert split.records.column("response").to_pylist()[0] == turns[3]["content"]
    rendered = chat.tokenizer.decode(split.prompt_ids[0] + split.response_ids[0])
    assert rendered.count("<|im_start|>user") == 2 and rendered.count("<|im_start|>assistant") == 2
    assert rendered.endswith("No: 9 = 3 x 3.<|im_end|>")
    truncated = tokenize_split(str(path), load_config(None, [f"data.train={path}", "data.max_prompt_tokens=128",
                                                            "data.overlong=truncate"]), chat)
    assert truncated.lengths.truncated == 1 and len(truncated.prompt_ids[1]) == 128
    assert chat.tokenizer.decode(truncated.prompt_ids[1]).endswith("And lakes?<|im_end|>\n<|im_start|>assistant\n")
