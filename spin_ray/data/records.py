"""SFT data: load prompt/response records from any fsspec URL, validate them, and give each a stable id."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from spin_ray.config import DataConfig

log = logging.getLogger(__name__)

# Built-in datasets vendored under spin_ray/builtin_data, with their licences.
# name -> (file, column mapping)
BUILTIN_DATASETS: dict[str, tuple[str, dict[str, str]]] = {
    "gsm8k": ("gsm8k/train.jsonl", {"prompt_column": "question", "response_column": "answer"}),
    "gsm8k:train": ("gsm8k/train.jsonl", {"prompt_column": "question", "response_column": "answer"}),
    "gsm8k:test": ("gsm8k/test.jsonl", {"prompt_column": "question", "response_column": "answer"}),
}

RECORD_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("response", pa.string()),
        ("source_row", pa.int64()),
    ]
)

_MAX_SKIP_EXAMPLES = 20


class DataError(ValueError):
    """A record that cannot be used. Carries the file, 1-based row (line for jsonl) and field."""

    def __init__(self, file: str, row: int | None, field: str | None, reason: str):
        self.file, self.row, self.field, self.reason = file, row, field, reason
        where = file
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {reason}")


@dataclass
class LoadReport:
    source: str
    rows_read: int = 0
    records: int = 0
    skipped: int = 0
    duplicates: int = 0
    skip_examples: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, source: str, part: str | None = None) -> "LoadReport":
        """An empty report of `source`, or of its training or validation part."""
        return cls(source=source if part is None else f"{source} ({part} part)")

    def summary(self) -> str:
        text = f"{self.source}: {self.records} records from {self.rows_read} rows"
        if self.skipped:
            text += f", {self.skipped} invalid rows skipped"
        if self.duplicates:
            text += f", {self.duplicates} exact duplicates dropped"
        return text


def record_id(prompt: list[dict[str, str]], response: str) -> str:
    """Content hash of a pair: the same record gets the same id in every run, on every machine."""
    blob = json.dumps({"prompt": prompt, "response": response}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def _builtin_url(name: str) -> str:
    relative = BUILTIN_DATASETS[name][0]
    return str(resources.files("spin_ray") / "builtin_data" / relative)


def resolve_source(source: str, cfg: DataConfig) -> tuple[str, DataConfig]:
    """Map a built-in name to its vendored file and column layout; pass other URLs through."""
    if source.lower() in BUILTIN_DATASETS:
        _, columns = BUILTIN_DATASETS[source.lower()]
        return _builtin_url(source.lower()), cfg.model_copy(update=columns)
    return source, cfg


def _detect_format(fs: fsspec.AbstractFileSystem, path: str, declared: str) -> str:
    if declared != "auto":
        return declared
    if fs.isdir(path):
        names = {p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
        if names & {"dataset_info.json", "state.json", "dataset_dict.json"}:
            return "hf"
        if any(n.endswith(".parquet") for n in names):
            return "parquet"
        raise DataError(path, None, None, "folder is neither a saved Hugging Face dataset nor parquet shards")
    lowered = path.lower()
    for suffix, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"), (".parquet", "parquet")):
        if lowered.endswith(suffix) or lowered.endswith(suffix + ".gz") or lowered.endswith(suffix + ".zst"):
            return fmt
    raise DataError(path, None, None, "cannot tell the format from the name; set data.format")


def _iter_jsonl(fs, path: str, url: str) -> Iterator[tuple[int, Any]]:
    line_number = 0
    try:
        with fs.open(path, "rb", compression="infer") as handle:
            for line_number, raw in enumerate(handle, start=1):
                if raw.strip():
                    yield line_number, _parse_jsonl_line(raw, line_number, url)
    except (OSError, EOFError) as exc:  # unreadable, or a corrupt .gz/.zst: the file's fault, not a row's
        where = f"after line {line_number}" if line_number else "at its start"
        raise DataError(url, None, None, f"unreadable {where} ({type(exc).__name__}: {exc})") from None


def _parse_jsonl_line(raw: bytes, line_number: int, url: str) -> Any:
    """The line's JSON value, or the DataError that names it (raised by the caller unless skip_invalid)."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return DataError(url, line_number, None, f"line is not valid UTF-8 ({exc.reason})")
    except json.JSONDecodeError as exc:
        return DataError(url, line_number, None, f"malformed JSON: {exc.msg} at column {exc.colno}")


def _iter_json(fs, path: str, url: str) -> Iterator[tuple[int, Any]]:
    try:
        with fs.open(path, "rt", compression="infer", encoding="utf-8") as handle:
            payload = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(url, None, None, f"file is not valid JSON: {exc}") from None
    except (OSError, EOFError) as exc:
        raise DataError(url, None, None, f"unreadable ({type(exc).__name__}: {exc})") from None
    if isinstance(payload, dict) and isinstance(payload.get("data"), list):
        payload = payload["data"]
    if not isinstance(payload, list):
        raise DataError(url, None, None, "a .json data file must hold a list of records (or {'data': [...]})")
    yield from enumerate(payload, start=1)


def _iter_parquet(fs, path: str, url: str) -> Iterator[tuple[int, Any]]:
    files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet")) if fs.isdir(path) else [path]
    row = 0
    for file in files:
        try:
            with fs.open(file, "rb") as handle:
                for batch in pq.ParquetFile(handle).iter_batches(batch_size=4096):
                    for item in batch.to_pylist():
                        row += 1
                        yield row, item
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(file, None, None, f"unreadable parquet: {exc}") from None


def _iter_hf(url: str, split: str) -> Iterator[tuple[int, Any]]:
    import datasets

    loaded = datasets.load_from_disk(url)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(url, None, None, f"split {split!r} not in saved dataset (has {sorted(loaded)})")
        loaded = loaded[split]
    yield from enumerate(loaded, start=1)


def iter_raw_rows(url: str, fmt: str = "auto", split: str = "train") -> Iterator[tuple[int, Any]]:
    """(row number, parsed row or DataError) pairs in file order, from any fsspec URL."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        raise DataError(url, None, None, "no such file or folder")
    fmt = _detect_format(fs, path, fmt)
    if fmt == "jsonl":
        return _iter_jsonl(fs, path, url)
    if fmt == "json":
        return _iter_json(fs, path, url)
    if fmt == "parquet":
        return _iter_parquet(fs, path, url)
    return _iter_hf(url, split)


def _require_text(value: Any, url: str, row: int, name: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DataError(url, row, name, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(url, row, name, "is empty")
    return value


def _from_messages(messages: Any, url: str, row: int, column: str) -> tuple[list[dict[str, str]], str]:
    if not isinstance(messages, list) or not messages:
        raise DataError(url, row, column, "expected a non-empty list of {role, content} messages")
    turns = []
    for index, message in enumerate(messages):
        name = f"{column}[{index}]"
        if not isinstance(message, dict):
            raise DataError(url, row, name, f"expected an object with role and content, got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message:
                raise DataError(url, row, f"{name}.{key}", "missing")
        role = _require_text(message["role"], url, row, f"{name}.role")
        content = _require_text(message["content"], url, row, f"{name}.content")
        turns.append({"role": role, "content": content})
    if turns[-1]["role"] != "assistant":
        raise DataError(url, row, f"{column}[{len(turns) - 1}].role", "the last message must be the assistant's")
    if len(turns) < 2 or turns[-2]["role"] != "user":
        raise DataError(url, row, column, "the assistant's answer must follow a user message")
    return turns[:-1], turns[-1]["content"]


def normalize_row(item: Any, url: str, row: int, cfg: DataConfig) -> tuple[list[dict[str, str]], str]:
    """One raw row -> (prompt messages, human response), or a DataError naming the field."""
    if isinstance(item, DataError):
        raise item
    if not isinstance(item, dict):
        raise DataError(url, row, None, f"expected a JSON object, got {type(item).__name__}")
    if cfg.messages_column in item and item[cfg.messages_column] is not None:
        prompt, response = _from_messages(item[cfg.messages_column], url, row, cfg.messages_column)
    else:
        for column in (cfg.prompt_column, cfg.response_column):
            if column not in item or item[column] is None:
                raise DataError(url, row, column, f"missing (and no {cfg.messages_column!r} chat column)")
        text = _require_text(item[cfg.prompt_column], url, row, cfg.prompt_column)
        response = _require_text(item[cfg.response_column], url, row, cfg.response_column)
        prompt = [{"role": "user", "content": text}]
    if cfg.system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": cfg.system_prompt}, *prompt]
    return prompt, response


def in_validation(prompt_id: str, fraction: float) -> bool:
    """Whether a record belongs to the validation split carved from its training set: the first 32 bits of its content
    hash, read as a share of 2^32, fall below `fraction`. The same records on every run, machine and data order."""
    return int(prompt_id[:8], 16) < fraction * 2**32


def iter_records(source: str, cfg: DataConfig, report: LoadReport, part: str | None = None,
                 ) -> Iterator[tuple[str, list, str, int]]:
    """(prompt_id, prompt messages, human response, source row) of every usable record of `source`, in file order,
    streaming: invalid rows raise DataError unless cfg.skip_invalid (then they are counted in `report`), exact
    duplicates are dropped (counted), and it stops after cfg.limit records. `part` "train" or "validation" keeps
    only the records outside or inside the validation carve (cfg.validation_fraction; see in_validation)."""
    url, cfg = resolve_source(source, cfg)
    seen: set[str] = set()
    for row, item in iter_raw_rows(url, cfg.format, cfg.split):
        report.rows_read += 1
        try:
            prompt, response = normalize_row(item, url, row, cfg)
        except DataError as exc:
            if not cfg.skip_invalid:
                raise
            report.skipped += 1
            if len(report.skip_examples) < _MAX_SKIP_EXAMPLES:
                report.skip_examples.append(str(exc))
            continue
        pid = record_id(prompt, response)
        if pid in seen:
            report.duplicates += 1
            continue
        seen.add(pid)
        if part is not None and in_validation(pid, cfg.validation_fraction) != (part == "validation"):
            continue
        report.records += 1
        yield pid, prompt, response, row
        if cfg.limit is not None and report.records >= cfg.limit:
            return
    if not report.records:
        where = "" if part is None else f" in its {part} part (data.validation_fraction {cfg.validation_fraction})"
        raise DataError(url, None, None,
                        f"no usable records{where} ({report.rows_read} rows read, {report.skipped} invalid)")


def check_records(source: str, cfg: DataConfig | None = None, part: str | None = None) -> LoadReport:
    """Read `source` as load_records would, keeping only the ids: the same errors, in one streaming pass, before
    anything starts (a run would otherwise find a bad row after its cluster and its baseline evaluation)."""
    report = LoadReport.of(source, part)
    for _ in iter_records(source, cfg or DataConfig(), report, part):
        pass
    return report


def load_records(source: str, cfg: DataConfig | None = None, part: str | None = None) -> tuple[pa.Table, LoadReport]:
    """Load, validate and id the SFT records of `source` into a table with RECORD_SCHEMA.

    Invalid rows raise DataError unless cfg.skip_invalid, in which case they are counted
    in the report. Exact duplicate records are dropped (counted) so every prompt_id is unique.
    `part`: the training or validation part of a carved set (see iter_records).
    """
    report = LoadReport.of(source, part)
    records = list(iter_records(source, cfg or DataConfig(), report, part))
    if report.skipped:
        log.warning("%s; first: %s", report.summary(), report.skip_examples[0])
    ids, prompts, responses, rows = (list(column) for column in zip(*records, strict=True))
    table = pa.table({"prompt_id": ids, "prompt": prompts, "response": responses, "source_row": rows}, RECORD_SCHEMA)
    return table, report
