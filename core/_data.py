"""Training data: rows from files or the Hub -> token ids with a train mask -> deterministic, resumable batches.

The pipeline::

    rows = read_rows("data/train.jsonl")                         # or a folder, or a Hub dataset id "org/name"
    data = tokenize_dataset(rows, tokenizer, "chat", seq_len=2048)
    train, val = split_validation(data, 0.05, seed=0)
    loader = DataLoader(train, batch_size=8, packing=True, seed=0)
    for batch in loader:                                          # one epoch, resumable mid-epoch
        logits = model(batch.tokens, **batch.model_kwargs())
        loss = F.cross_entropy(logits.view(-1, V), batch.targets.view(-1), ignore_index=-100, reduction="sum")
        loss = loss / batch.global_num_targets

:func:`load_datasets` runs the first three steps from a :class:`DataConfig` (or a program's own config object);
a program calls it before loading the model, so a bad or empty dataset fails in seconds.

**Sources** (:func:`read_rows`):

* ``.jsonl`` / ``.ndjson``: one JSON object per line (blank lines ignored).
* ``.json``: an array of objects, or an object holding that array under the split name (``"train"``) or
  ``"data"``; a ``.json`` file that is really JSON Lines is read as such.
* ``.csv``: a header row, then one row per sample (all values are strings; a chat column may hold JSON text).
* ``.parquet``: one row per sample (read with pyarrow; nested columns become lists / dicts).
* ``.txt``: plain text, **one sample per paragraph**: paragraphs are separated by one or more blank (or
  whitespace-only) lines; the lines of a paragraph are joined with ``"\\n"``. Rows have a ``text`` field.
* a folder: every data file under it (recursively, dot-files skipped), sorted by path, filtered by split (below).
* a Hugging Face Hub dataset id ``org/name`` (optionally ``org/name@revision``; ``hf://datasets/org/name`` works
  too) that is not an existing local path: the repo's data files are fetched with
  ``huggingface_hub.snapshot_download`` (cached in the usual HF cache), filtered by split; when the split has
  files of several formats only one format is read (parquet, then jsonl, json, csv, txt) since Hub repos often
  hold the same data twice.

Split filtering (folders and the Hub): a file belongs to a split when a word of its path (split at any
non-alphanumeric character) names it, with the keywords of ``datasets`` (``datasets.data_files.SPLIT_KEYWORDS``):
``train``/``training``; ``validation``/``valid``/``dev``/``val``; ``test``/``testing``/``eval``/``evaluation``;
any other split name by itself. So ``data/train-00000-of-00001.parquet``
and ``train/part0.jsonl`` are ``train``. If no file names any split, every file is ``train``. A single file is read
whatever the split.

**Formats** (:class:`Format`), each giving ids and a mask of the tokens to train on:

* ``"instruct"``: columns ``instruction``, ``input`` (optional), ``output``, ``system`` (optional); the chat
  ``[system?, user: instruction + "\\n\\n" + input, assistant: output]`` goes through the tokenizer's chat template;
  only the response (and the end-of-turn token after it) is trained.
* ``"chat"``: ``messages`` (OpenAI ``[{"role", "content"}]``) or ``conversations`` (ShareGPT ``[{"from",
  "value"}]``, from ``human``/``user``, ``gpt``/``assistant``, ``system``), detected per row; only assistant turns
  are trained (``train_on_input=True`` trains every token).
* ``"text"``: a ``text`` column, encoded with bos (if the tokenizer has one) and eos; every token is trained.
* ``"auto"``: picked from the first row's columns (messages/conversations -> chat, instruction+output -> instruct,
  text -> text).

``columns`` maps these canonical names to the dataset's (``{"instruction": "prompt", "output": "completion"}``).

Malformed rows raise :class:`DataError` naming the file and line (or row) and the problem, or with
``skip_bad=True`` are skipped and counted in :attr:`TokenizedDataset.stats`.

**Preference data** (``format = "preference"``, :func:`load_preference_datasets` -> :class:`PreferenceDataset`,
batched by :class:`PreferenceLoader`), from the same sources:

* pairs: ``prompt``, ``chosen``, ``rejected``. Strings: the prompt is a user turn, each response the assistant's
  turn. Message lists (UltraFeedback-binarized, HH-RLHF style): ``chosen`` / ``rejected`` that start with a
  non-assistant message hold the whole conversation (a ``prompt`` field is then not used); lists that start with
  the assistant's message hold only the response, and ``prompt`` (a string or a message list) goes before it. The
  response is the final message, which must be the assistant's; the prompt is every message before it and must
  be the same in ``chosen`` and ``rejected``; the two responses must differ.
* unpaired (KTO): ``prompt``, ``completion`` (as ``chosen`` above), ``label`` (true/false, 1/0, or the strings
  ``"true"`` / ``"false"`` / ``"1"`` / ``"0"``).
* the layout: a ``chosen`` column in the first row means pairs, else a ``completion`` column means unpaired
  (``paired=True/False`` demands one). CSV cells holding a JSON array are message lists.
* a ``system`` column or ``system_prompt`` adds a system message; ``fold_system``, ``template`` and ``columns``
  work as for SFT.

Each sample is prompt + response through the chat template, the mask on the response (and its end-of-turn token).
Too long for ``seq_len``: the response keeps its tokens and the prompt is cut from the left (a leading bos
stays), by the longer response of a pair so that both keep the same prompt tokens; a response too long to fit
beside :data:`MIN_PROMPT_TOKENS` of prompt is cut at its end. :class:`PreferenceStats` counts the cuts.

**Prompt data** (``format = "prompt"``, :func:`load_prompt_datasets` -> :class:`PromptDataset`, for sampling in
RL): a ``prompt`` (a string: one user turn; or a message list ending with the user's) through the chat template
with the generation prompt; the row's other columns travel with it (rewards read them).
"""

from __future__ import annotations

import bisect
import csv
import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
import torch

from ._tokenizer import fold_system

IGNORE_INDEX = -100
"""The target value of positions that are not trained (``cross_entropy(..., ignore_index=-100)``)."""

DATA_EXTENSIONS = (".parquet", ".jsonl", ".ndjson", ".json", ".csv", ".txt")
"""File types :func:`read_rows` reads, in the order of preference for Hub repos."""

_META_FILES = {"dataset_infos.json", "dataset_info.json", "dataset_dict.json", "state.json", "config.json"}
_META_STEMS = {"readme", "license", "licence", "citation", "notice", "requirements", "changelog"}
_HUB_ID = re.compile(r"(?:hf://datasets/)?([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@([\w./-]+))?")


class DataError(ValueError):
    """A dataset that cannot be used: unreadable source, malformed row, or nothing left to train on."""


class _NoSplit(DataError):
    """A folder or Hub repo has no files for the requested split."""


# ----------------------------------------------------------------------------------------------------- rows


@attrs.frozen
class Row:
    """One record of a source and where it came from.

    Attributes:
        data: the record's fields (``{"text": ...}`` for ``.txt``); None when it could not be parsed.
        file: the file it was read from.
        line: 1-based line number (JSON Lines, ``.txt``: the paragraph's first line; CSV: the record's first line).
        row: 1-based record number (CSV without the header, Parquet, JSON arrays).
        error: why the record could not be parsed (then ``data`` is None); the tokenizing step reports or skips it.
    """

    data: dict[str, Any] | None
    file: str
    line: int | None = None
    row: int | None = None
    error: str | None = None

    @property
    def where(self) -> str:
        """``"data.jsonl:17"``, ``"data.csv row 3 (line 4)"`` or ``"data.parquet row 12"``."""
        if self.row is None:
            return f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{self.file} row {self.row}" + (f" (line {self.line})" if self.line is not None else "")


def read_rows(source: str | Path, *, split: str = "train") -> list[Row]:
    """Every row of ``source`` (a data file, a folder of them, or a Hub dataset id); see the module docstring.

    Rows that cannot be parsed (a bad JSON line, a CSV record with the wrong number of fields, an array element
    that is not an object) come back with ``error`` set, so that :func:`tokenize_dataset` can name or skip them.
    A missing source, an unknown file type, an unreadable file or a source without rows raises :class:`DataError`.
    """
    files = data_files(source, split=split)
    rows: list[Row] = []
    for file in files:
        rows.extend(read_file(file, split=split))
    if not rows:
        names = ", ".join(str(f) for f in files[:5])
        raise DataError(f"{source}: no rows (split {split!r}; files: {names})")
    return rows


def data_files(source: str | Path, *, split: str = "train") -> list[Path]:
    """The data files :func:`read_rows` reads for ``source`` and ``split`` (downloading Hub datasets)."""
    path = Path(source).expanduser()
    if path.is_file():
        if _extension(path) is None:
            raise DataError(f"{path}: unsupported file type; expected one of {', '.join(DATA_EXTENSIONS)}")
        return [path]
    if path.is_dir():
        return _split_files(path, _folder_files(path), split, one_format=False)
    m = _HUB_ID.fullmatch(str(source))
    if m is None or path.exists() or _extension(path) is not None:  # "data/train.jsonl" is a missing file
        raise DataError(f"{source}: no such file or folder (and not a Hugging Face dataset id 'org/name')")
    folder = _hub_download(m.group(1), m.group(2))
    return _split_files(folder, _folder_files(folder), split, one_format=True, name=m.group(1))


def _extension(path: Path) -> str | None:
    name = path.name.lower()
    return next((ext for ext in DATA_EXTENSIONS if name.endswith(ext)), None)


def _folder_files(folder: Path) -> list[Path]:
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file() or _extension(p) is None:
            continue
        if p.name.lower() in _META_FILES or p.name.lower().split(".")[0] in _META_STEMS:
            continue
        out.append(p)
    return sorted(out, key=lambda p: p.relative_to(folder).as_posix())


def _split_words(rel: str) -> set[str]:
    return set(re.split(r"[^a-z0-9]+", rel.lower()))


def _split_keywords() -> dict[str, list[str]]:
    """The words that name each standard split in a path, as ``datasets`` defines them (``{"train": ["train",
    "training"], ...}``)."""
    from datasets.data_files import SPLIT_KEYWORDS  # imported only here: importing datasets takes about a second

    return {str(split): list(words) for split, words in SPLIT_KEYWORDS.items()}


def _split_files(folder: Path, files: list[Path], split: str, *, one_format: bool,
                 name: str | None = None) -> list[Path]:
    where = name or str(folder)
    if not files:
        raise DataError(f"{where}: no data files ({', '.join(DATA_EXTENSIONS)})")
    keywords = _split_keywords()
    aliases = set(keywords.get(split, [split.lower()]))
    known = set().union(*keywords.values()) | aliases
    words = {f: _split_words(f.relative_to(folder).as_posix()) for f in files}
    chosen = [f for f in files if words[f] & aliases]
    if not chosen:
        if split == "train" and not any(words[f] & known for f in files):
            chosen = files
        else:
            listed = ", ".join(f.relative_to(folder).as_posix() for f in files[:8])
            raise _NoSplit(f"{where}: no files for split {split!r} (files: {listed})")
    if one_format:
        exts = {_extension(f) for f in chosen}
        best = next(ext for ext in DATA_EXTENSIONS if ext in exts)
        chosen = [f for f in chosen if _extension(f) == best]
    return chosen


def _hub_download(repo_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, repo_type="dataset", revision=revision,
                                   allow_patterns=[f"*{ext}" for ext in DATA_EXTENSIONS])
    except Exception as e:  # network, missing repo, gated repo...: all mean "cannot use this source"
        raise DataError(f"{repo_id}: not a local file or folder, and could not download the Hugging Face dataset: "
                        f"{type(e).__name__}: {e}") from e
    return Path(folder)


def read_file(path: str | Path, *, split: str = "train") -> list[Row]:
    """The rows of one data file (its type from the extension); ``split`` picks the list in a JSON object."""
    path = Path(path)
    ext = _extension(path)
    readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".csv": _read_csv,
               ".parquet": _read_parquet, ".txt": _read_txt}
    if ext is None:
        raise DataError(f"{path}: unsupported file type; expected one of {', '.join(DATA_EXTENSIONS)}")
    try:
        return readers[ext](path, split)
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from e


def _json_loads(data: bytes | str) -> Any:
    try:
        import orjson

        return orjson.loads(data)
    except ImportError:  # pragma: no cover - orjson is a dependency
        return json.loads(data)


def _object_row(obj: Any, file: str, *, line: int | None = None, row: int | None = None) -> Row:
    if isinstance(obj, dict):
        return Row(obj, file, line=line, row=row)
    return Row(None, file, line=line, row=row, error=f"expected a JSON object, got {_type_name(obj)}")


def _read_jsonl(path: Path, split: str) -> list[Row]:
    rows = []
    file = str(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            try:
                obj = _json_loads(raw)
            except json.JSONDecodeError as e:
                rows.append(Row(None, file, line=lineno, error=f"invalid JSON: {e.msg}"))
                continue
            rows.append(_object_row(obj, file, line=lineno))
    return rows


def _read_json(path: Path, split: str) -> list[Row]:
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        obj = _json_loads(raw)
    except json.JSONDecodeError as e:
        lines = [line for line in raw.splitlines() if line.strip()]
        if len(lines) > 1 and lines[0].lstrip().startswith(b"{"):  # JSON Lines saved as .json
            return _read_jsonl(path, split)
        raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    if isinstance(obj, dict):
        key = next((k for k in (split, "data") if isinstance(obj.get(k), list)), None)
        if key is None:
            raise DataError(f"{path}: expected a JSON array of objects, or an object with a list under "
                            f"{split!r} or 'data' (keys: {', '.join(map(str, list(obj)[:10]))})")
        obj = obj[key]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {_type_name(obj)}")
    file = str(path)
    return [_object_row(item, file, row=i) for i, item in enumerate(obj, 1)]


def _read_csv(path: Path, split: str) -> list[Row]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    rows = []
    file = str(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                return []
            start = reader.line_num + 1
            for index, record in enumerate(reader, 1):
                line, start = start, reader.line_num + 1
                if not record or not any(field.strip() for field in record):
                    continue  # blank line
                if len(record) != len(header):
                    rows.append(Row(None, file, line=line, row=index,
                                    error=f"has {len(record)} fields, the header has {len(header)}"))
                    continue
                rows.append(Row(dict(zip(header, record)), file, line=line, row=index))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text: {e}") from e
    except csv.Error as e:
        raise DataError(f"{path}: invalid CSV: {e}") from e
    return rows


def _read_parquet(path: Path, split: str) -> list[Row]:
    import pyarrow.parquet as pq

    file = str(path)
    try:
        records = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises its own error types for corrupt files
        raise DataError(f"{path}: cannot read Parquet: {e}") from e
    return [Row(record, file, row=i) for i, record in enumerate(records, 1)]


def _read_txt(path: Path, split: str) -> list[Row]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text: {e}") from e
    rows, lines, first = [], [], 0
    file = str(path)
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            if not lines:
                first = lineno
            lines.append(line)
        elif lines:
            rows.append(Row({"text": "\n".join(lines)}, file, line=first))
            lines = []
    if lines:
        rows.append(Row({"text": "\n".join(lines)}, file, line=first))
    return rows


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------------------------------- formats


class TokenizerLike(Protocol):
    """What the data pipeline needs of :class:`ftprog.core.Tokenizer`."""

    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    chat_template: str | None

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], *,
                    add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]: ...

    def with_chat_template(self, template: str) -> TokenizerLike: ...


FORMATS = ("auto", "instruct", "chat", "text", "preference", "prompt")
_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
          "chatgpt": "assistant", "model": "assistant", "bard": "assistant", "bing": "assistant"}


def _str_dict(value: Mapping[str, str] | None) -> dict[str, str]:
    return dict(value or {})


@attrs.frozen
class Format:
    """How rows become a chat or a text (see the module docstring).

    Attributes:
        kind: ``"auto"``, ``"instruct"``, ``"chat"``, ``"text"``, or ``"preference"`` (read by
            :func:`tokenize_preferences`, not :func:`tokenize_dataset`).
        columns: canonical name -> dataset column (``instruction``, ``input``, ``output``, ``system``,
            ``messages``, ``text``; preference data: ``prompt``, ``chosen``, ``rejected``, ``completion``,
            ``label``), e.g. ``{"instruction": "prompt", "output": "completion"}``.
        system_prompt: a system message for rows that have none (instruct and chat).
        template: None (or ``"model"``) to use the tokenizer's chat template, ``"chatml"`` for ChatML, or a Jinja
            template string.
        train_on_input: train on every token (prompts too), not only assistant turns.
        fold_system: put a system message at the start of the first user turn (``system + "\n\n" + user``),
            for chat templates without a system role (Gemma's).
    """

    kind: str = attrs.field(default="auto")
    columns: dict[str, str] = attrs.field(factory=dict, converter=_str_dict, hash=False)
    system_prompt: str | None = None
    template: str | None = None
    train_on_input: bool = False
    fold_system: bool = False

    @kind.validator
    def _check_kind(self, _attribute, value):
        if value not in FORMATS:
            raise DataError(f"unknown data format {value!r}; choose from {', '.join(FORMATS)}")

    def column(self, name: str) -> str:
        return self.columns.get(name, name)


class _BadRow(Exception):
    """A row the format cannot use (message without location)."""


def detect_format(rows: Sequence[Row], columns: Mapping[str, str] | None = None) -> str:
    """``"chat"``, ``"instruct"`` or ``"text"`` from the first parsed row's fields (DataError if none fits)."""
    columns = columns or {}
    first = next((r for r in rows if r.data is not None), None)
    if first is None:
        raise DataError("cannot detect the data format: no row could be parsed"
                        + (f" (first: {rows[0].where}: {rows[0].error})" if rows else ""))
    keys = first.data.keys()
    if columns.get("messages", "messages") in keys or ("messages" not in columns and "conversations" in keys):
        return "chat"
    if columns.get("instruction", "instruction") in keys and columns.get("output", "output") in keys:
        return "instruct"
    if columns.get("text", "text") in keys:
        return "text"
    raise DataError(f"{first.where}: cannot detect the data format from columns {sorted(map(str, keys))}; expected "
                    "'messages' or 'conversations' (chat), 'instruction' and 'output' (instruct) or 'text' (text); "
                    "set the format and a column mapping")


def _field(data: Mapping[str, Any], fmt: Format, name: str, *, required: bool = True) -> str | None:
    column = fmt.column(name)
    label = repr(column) if column == name else f"{column!r} ({name})"
    value = data.get(column)
    if value is None:
        if required:
            have = ", ".join(map(str, list(data)[:10]))
            raise _BadRow(f"missing field {label} (the row has: {have})")
        return None
    if not isinstance(value, str):
        raise _BadRow(f"field {label} should be a string, got {_type_name(value)}")
    return value


def _content(value: Any, index: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)  # OpenAI content parts, text only
    raise _BadRow(f"message {index}: content should be a string, got {_type_name(value)}")


def _messages(data: Mapping[str, Any], fmt: Format) -> list[dict[str, str]]:
    if "messages" in fmt.columns:
        column = fmt.columns["messages"]
    else:
        column = "messages" if data.get("messages") is not None else "conversations"
    conv = data.get(column)
    if conv is None:
        wanted = repr(column) if "messages" in fmt.columns else "'messages' or 'conversations'"
        raise _BadRow(f"missing field {wanted} (the row has: {', '.join(map(str, list(data)[:10]))})")
    if isinstance(conv, str):  # CSV cells hold JSON text
        try:
            conv = _json_loads(conv)
        except json.JSONDecodeError as e:
            raise _BadRow(f"field {column!r} is a string that is not JSON: {e.msg}") from e
    messages = _parse_messages(conv, column)
    if not any(m["role"] == "assistant" for m in messages):
        raise _BadRow("the conversation has no assistant turn")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise _BadRow("every assistant turn is empty")
    if fmt.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": fmt.system_prompt})
    return _folded(messages) if fmt.fold_system else messages


def _parse_messages(conv: Any, column: str) -> list[dict[str, str]]:
    """OpenAI (``role``/``content``) or ShareGPT (``from``/``value``) messages -> ``[{"role", "content"}]`` with
    the roles system / user / assistant."""
    if not isinstance(conv, list):
        raise _BadRow(f"field {column!r} should be a list of messages, got {_type_name(conv)}")
    messages = []
    for i, m in enumerate(conv):
        if not isinstance(m, dict):
            raise _BadRow(f"message {i} should be an object, got {_type_name(m)}")
        if "role" in m:
            role, content = m["role"], m.get("content")
        elif "from" in m:
            role, content = m["from"], m.get("value")
        else:
            raise _BadRow(f"message {i} has neither 'role' (OpenAI) nor 'from' (ShareGPT)")
        if not isinstance(role, str) or role.lower() not in _ROLES:
            raise _BadRow(f"message {i}: unsupported role {role!r} (expected system, user/human, assistant/gpt)")
        if content is None:
            raise _BadRow(f"message {i} ({role}) has no content")
        messages.append({"role": _ROLES[role.lower()], "content": _content(content, i)})
    return messages


def _instruct_messages(data: Mapping[str, Any], fmt: Format) -> list[dict[str, str]]:
    instruction = _field(data, fmt, "instruction")
    extra = _field(data, fmt, "input", required=False) or ""
    output = _field(data, fmt, "output")
    system = _field(data, fmt, "system", required=False) or fmt.system_prompt
    if not output.strip():
        raise _BadRow(f"empty field {fmt.column('output')!r}")
    if not instruction.strip() and not extra.strip():
        raise _BadRow(f"empty field {fmt.column('instruction')!r}")
    if not extra.strip():
        user = instruction
    elif not instruction.strip():
        user = extra
    else:
        user = instruction + "\n\n" + extra
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return _folded(messages) if fmt.fold_system else messages


def _folded(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    try:
        return fold_system(messages)
    except ValueError as e:
        raise _BadRow(str(e)) from None


def _bounded(text: str, tokenizer: TokenizerLike, seq_len: int, *, keep_end: bool = False) -> str:
    """``text``, or a prefix of it that still encodes to more than ``seq_len`` tokens (plus a margin); with
    ``keep_end``, a suffix (for prompts, which are cut from the left).

    Samples are cut to ``seq_len`` tokens, so tokenizing the whole of a huge row (a 10 MB line took 4 GB)
    is wasted work: a prefix of ``16 * (seq_len + margin)`` characters is tried, doubled until it is long
    enough. The margin keeps the first ``seq_len`` tokens those of the whole text (a cut changes only the
    last tokens of the prefix, where it splits a word). The work is then bounded by about twice that of a
    sample of ``seq_len`` tokens.
    """
    enough = seq_len + _BOUND_MARGIN
    size = 16 * enough
    while size < len(text):
        part = text[-size:] if keep_end else text[:size]
        if len(tokenizer.encode(part)) > enough:
            return part
        size *= 2
    return text


_BOUND_MARGIN = 16


def _encode_row(data: Mapping[str, Any], fmt: Format, tokenizer: TokenizerLike,
                seq_len: int) -> tuple[list[int], list[bool]]:
    if fmt.kind == "text":
        text = _field(data, fmt, "text")
        if not text.strip():
            raise _BadRow(f"empty field {fmt.column('text')!r}")
        text = _bounded(text, tokenizer, seq_len)
        ids = tokenizer.encode(text, add_bos=tokenizer.bos_id is not None, add_eos=tokenizer.eos_id is not None)
        return ids, [True] * len(ids)
    messages = _instruct_messages(data, fmt) if fmt.kind == "instruct" else _messages(data, fmt)
    messages = [{**m, "content": _bounded(m["content"], tokenizer, seq_len)} for m in messages]
    try:
        ids, mask = tokenizer.encode_chat(messages)
    except ValueError as e:
        raise _BadRow(f"chat template: {e}") from e
    mask = [True] * len(ids) if fmt.train_on_input else [bool(m) for m in mask]
    return list(ids), mask


def chat_tokenizer(tokenizer: TokenizerLike, template: str | None) -> TokenizerLike:
    """``tokenizer`` with the chat template ``template`` selects: None / ``"model"``: its own (DataError if it has
    none); ``"chatml"``: :data:`ftprog.core._tokenizer.CHATML_TEMPLATE`; else a Jinja template string."""
    if template in (None, "", "model"):
        if tokenizer.chat_template is None:
            raise DataError(f"the tokenizer ({getattr(tokenizer, 'source', '?')}) has no chat template, needed for "
                            "the instruct and chat formats; set template='chatml' (or a Jinja template) or use "
                            "an instruct/chat model's tokenizer")
        return tokenizer
    if template.lower() == "chatml":
        from ._tokenizer import CHATML_TEMPLATE

        template = CHATML_TEMPLATE
    elif "{{" not in template and "{%" not in template:
        raise DataError(f"template must be 'chatml' or a Jinja chat template, got {template!r}")
    try:
        return tokenizer.with_chat_template(template)
    except ValueError as e:
        raise DataError(f"invalid chat template: {e}") from e


# ------------------------------------------------------------------------------------------- tokenized dataset


@attrs.define
class DataStats:
    """What tokenizing a dataset kept and dropped.

    Attributes:
        rows: rows read.
        samples: samples kept.
        skipped: malformed rows skipped (``skip_bad=True``).
        skipped_examples: ``"where: problem"`` for the first few skipped rows.
        truncated: samples cut to ``seq_len`` tokens.
        no_targets: samples dropped because no trained token was left (after truncation).
        tokens: tokens in the kept samples.
        trained_tokens: tokens that are targets (the sum of ``Batch.num_targets`` over an epoch).
    """

    rows: int = 0
    samples: int = 0
    skipped: int = 0
    skipped_examples: list[str] = attrs.field(factory=list)
    truncated: int = 0
    no_targets: int = 0
    tokens: int = 0
    trained_tokens: int = 0

    def summary(self) -> str:
        text = (f"{self.samples} samples from {self.rows} rows, {self.tokens} tokens "
                f"({self.trained_tokens} trained)")
        notes = [f"{n} {what}" for n, what in ((self.skipped, "bad rows skipped"),
                                               (self.truncated, "truncated"),
                                               (self.no_targets, "dropped with no trained tokens")) if n]
        return text + ("; " + ", ".join(notes) if notes else "")


@attrs.frozen(eq=False)
class TokenizedDataset:
    """Samples of token ids with a per-token train mask, stored flat.

    Sample ``i`` is ``ids[offsets[i]:offsets[i+1]]``; ``mask`` is True for the tokens to train on (predict). The
    first token of a sample is never trained (nothing precedes it to predict it from).

    Attributes:
        ids: ``[total_tokens]`` int64.
        mask: ``[total_tokens]`` bool.
        offsets: ``[num_samples + 1]`` int64.
        seq_len: the length samples were truncated to.
        pad_id: the id padding uses (the tokenizer's pad id, else its eos id, else 0).
        stats: :class:`DataStats`.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    offsets: torch.Tensor
    seq_len: int
    pad_id: int
    stats: DataStats = attrs.field(factory=DataStats)

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, mask)`` of sample ``index``."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"sample {index} out of range ({n} samples)")
        index %= n
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.ids[start:end], self.mask[start:end]

    @property
    def lengths(self) -> torch.Tensor:
        """``[num_samples]`` int64 token counts."""
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def num_tokens(self) -> int:
        return self.ids.numel()

    @property
    def num_targets(self) -> int:
        return int(self.mask.sum())

    def subset(self, indices: Iterable[int]) -> TokenizedDataset:
        """The samples at ``indices`` (in that order), stats recounted for them (row counts kept)."""
        indices = [int(i) for i in indices]
        pieces = [self[i] for i in indices]
        data = _pack_samples(pieces, self.seq_len, self.pad_id)
        stats = attrs.evolve(self.stats, samples=len(data), tokens=data.num_tokens,
                             trained_tokens=data.num_targets)
        return attrs.evolve(data, stats=stats)

    @classmethod
    def from_samples(cls, samples: Sequence[tuple[Sequence[int], Sequence[bool]]], seq_len: int,
                     pad_id: int = 0) -> TokenizedDataset:
        """A dataset of ready ``(ids, mask)`` pairs (lists or tensors; the first mask entry is ignored)."""
        data = _pack_samples(samples, seq_len, pad_id)
        stats = DataStats(rows=len(data), samples=len(data), tokens=data.num_tokens, trained_tokens=data.num_targets)
        return attrs.evolve(data, stats=stats)


def _pack_samples(samples: Sequence[tuple[Any, Any]], seq_len: int, pad_id: int) -> TokenizedDataset:
    ids = [torch.as_tensor(s[0], dtype=torch.int64).reshape(-1) for s in samples]
    masks = [torch.as_tensor(s[1], dtype=torch.bool).reshape(-1).clone() for s in samples]
    for i, m in zip(ids, masks):
        if i.numel() != m.numel():
            raise ValueError(f"ids and mask lengths differ ({i.numel()} vs {m.numel()})")
        if m.numel():
            m[0] = False
    lengths = torch.tensor([0] + [i.numel() for i in ids], dtype=torch.int64)
    return TokenizedDataset(
        ids=torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int64),
        mask=torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool),
        offsets=lengths.cumsum(0), seq_len=seq_len, pad_id=pad_id,
    )


def tokenize_dataset(
    rows: Iterable[Row],
    tokenizer: TokenizerLike,
    fmt: str | Format = "auto",
    seq_len: int = 2048,
    *,
    columns: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
    template: str | None = None,
    train_on_input: bool = False,
    fold_system: bool = False,
    skip_bad: bool = False,
    allow_empty: bool = False,
) -> TokenizedDataset:
    """Token ids and train masks of ``rows`` in format ``fmt`` (a :class:`Format` or its kind), cut at ``seq_len``.

    The keyword options build the :class:`Format` when ``fmt`` is a string. A malformed row raises
    :class:`DataError` (``"file:line: problem"``) unless ``skip_bad``, which skips and counts it. Samples with
    no trained token after truncation are dropped and counted. No sample left raises DataError unless
    ``allow_empty``.
    """
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    rows = list(rows)
    if isinstance(fmt, str):
        fmt = Format(fmt, columns or {}, system_prompt, template, train_on_input, fold_system)
    if fmt.kind == "preference":
        raise DataError("format 'preference' is preference data (chosen/rejected or completion/label): read it "
                        "with load_preference_datasets or tokenize_preferences")
    if fmt.kind == "prompt":
        raise DataError("format 'prompt' is prompts to sample from: read it with load_prompt_datasets or "
                        "tokenize_prompts")
    if fmt.kind == "auto":
        fmt = attrs.evolve(fmt, kind=detect_format(rows, fmt.columns))
    if fmt.kind in ("instruct", "chat"):
        tokenizer = chat_tokenizer(tokenizer, fmt.template)
    stats = DataStats(rows=len(rows))
    samples: list[tuple[list[int], list[bool]]] = []
    for row in rows:
        try:
            if row.error is not None:
                raise _BadRow(row.error)
            ids, mask = _encode_row(row.data, fmt, tokenizer, seq_len)
        except _BadRow as e:
            if not skip_bad:
                raise DataError(f"{row.where}: {e} (set skip_bad to skip bad rows)") from None
            stats.skipped += 1
            if len(stats.skipped_examples) < 10:
                stats.skipped_examples.append(f"{row.where}: {e}")
            continue
        if len(ids) > seq_len:
            stats.truncated += 1
            ids, mask = ids[:seq_len], mask[:seq_len]
        if not any(mask[1:]):
            stats.no_targets += 1
            continue
        samples.append((ids, mask))
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    data = _pack_samples(samples, seq_len, pad_id)
    stats.samples, stats.tokens, stats.trained_tokens = len(data), data.num_tokens, data.num_targets
    data = attrs.evolve(data, stats=stats)
    if not len(data) and not allow_empty:
        where = rows[0].file if rows else "the dataset"
        detail = f"; first skipped: {stats.skipped_examples[0]}" if stats.skipped_examples else ""
        raise DataError(f"{where}: no usable samples ({stats.summary()}){detail}")
    return data


def split_validation(data: TokenizedDataset | PreferenceDataset | Sequence[Row], fraction: float, seed: int = 0):
    """``(train, val)``: a deterministic random ``fraction`` (or, if >= 1, that many samples) held out.

    Works on a :class:`TokenizedDataset`, a :class:`PreferenceDataset` (pairs held out whole) or a list of
    rows; both parts keep the original order. At least one
    sample is held out for a positive fraction, and at least one is left to train on (else DataError).
    """
    n = len(data)
    if fraction <= 0:
        raise DataError(f"validation fraction must be positive, got {fraction}")
    k = int(fraction) if fraction >= 1 else max(1, round(fraction * n))
    if k >= n:
        raise DataError(f"cannot hold out {k} of {n} samples for validation and still train")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    val_idx, train_idx = sorted(perm[:k]), sorted(perm[k:])
    if isinstance(data, (TokenizedDataset, PreferenceDataset, PromptDataset)):
        return data.subset(train_idx), data.subset(val_idx)
    return [data[i] for i in train_idx], [data[i] for i in val_idx]


# ---------------------------------------------------------------------------------------------------- config


@attrs.frozen
class DataConfig:
    """Everything :func:`load_datasets` needs (mirrors the ``[data]`` section of the sft program's config).

    Attributes:
        path: a file, folder or Hub dataset id (see :func:`read_rows`).
        format: ``"auto"``, ``"instruct"``, ``"chat"`` or ``"text"`` (:func:`load_datasets`), or ``"preference"``
            (:func:`load_preference_datasets`).
        split: the split to read from folders / Hub repos.
        columns: canonical -> dataset column names (see :class:`Format`).
        template: ``"model"`` (or None / ""): the tokenizer's chat template; ``"chatml"``; or a Jinja template.
        system_prompt: system message for instruct/chat rows that have none ("" for none).
        train_on_input: train on prompts too.
        fold_system: put system messages at the start of the first user turn (templates without a system role).
        val_path: a separate validation source ("" or None: none).
        val_split: without ``val_path``, the validation split of ``path`` (or of ``val_path``), used when the
            source is a folder or Hub repo that has files for it.
        val_fraction: otherwise hold out this fraction (or count, if >= 1) of the training samples (0: none).
        skip_bad: skip malformed rows instead of failing.
        seq_len: tokens per sample (longer samples are truncated) and per packed row.
        seed: seed of the validation hold-out.
    """

    path: str
    format: str = "auto"
    split: str = "train"
    columns: dict[str, str] = attrs.field(factory=dict, converter=_str_dict, hash=False)
    template: str | None = "model"
    system_prompt: str | None = None
    train_on_input: bool = False
    fold_system: bool = False
    val_path: str | None = None
    val_split: str | None = "validation"
    val_fraction: float = 0.0
    skip_bad: bool = False
    seq_len: int = 2048
    seed: int = 0


def format_of(config: Any) -> Format:
    """The :class:`Format` of a data config (:class:`DataConfig` or any object with its attributes)."""
    template = getattr(config, "template", None)
    if template in ("", "model"):
        template = None
    return Format(getattr(config, "format", "auto"), getattr(config, "columns", None) or {},
                  getattr(config, "system_prompt", None) or None, template,
                  bool(getattr(config, "train_on_input", False)), bool(getattr(config, "fold_system", False)))


def load_datasets(config: Any, tokenizer: TokenizerLike, *, seq_len: int | None = None,
                  seed: int | None = None) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """``(train, val or None)``: read, tokenize and hold out; raises :class:`DataError` early on bad data.

    ``config`` is a :class:`DataConfig` or any object with its attributes (``seq_len`` / ``seed`` may instead
    be given here; the arguments win). Validation data, first match: ``val_path`` (its ``val_split`` for
    folders / Hub repos, else all of it); the ``val_split`` files of a folder or Hub ``path``; a
    ``val_fraction`` hold-out of the training samples; none.
    """
    seq_len = seq_len if seq_len is not None else getattr(config, "seq_len", 2048)
    skip_bad = bool(getattr(config, "skip_bad", False))
    fmt = format_of(config)
    return _train_and_validation(
        config, lambda rows: tokenize_dataset(rows, tokenizer, fmt, seq_len, skip_bad=skip_bad), seed)


def _train_and_validation(config: Any, tokenize: Callable[[list[Row]], Any], seed: int | None) -> tuple[Any, Any]:
    """``(train, val or None)`` of a data config, each tokenized by ``tokenize(rows)``; where validation comes
    from is :func:`load_datasets`'s rule."""
    seed = seed if seed is not None else getattr(config, "seed", 0)
    path = str(config.path)
    train = tokenize(read_rows(path, split=getattr(config, "split", "train") or "train"))
    val_path = getattr(config, "val_path", None) or None
    val_split = getattr(config, "val_split", None) or None
    rows = None
    if val_path is not None:
        try:
            rows = read_rows(val_path, split=val_split or "validation")
        except _NoSplit:
            rows = read_rows(val_path, split="train")  # a folder without split names: all of it
    elif val_split is not None and not Path(path).is_file():
        try:
            rows = read_rows(path, split=val_split)
        except _NoSplit:
            rows = None
    if rows is not None:
        return train, tokenize(rows)
    fraction = float(getattr(config, "val_fraction", 0.0) or 0.0)
    if fraction > 0:
        return split_validation(train, fraction, seed)
    return train, None


# ----------------------------------------------------------------------------------------------------- batches


@attrs.frozen(eq=False)
class Batch:
    """One (micro-)batch, ready for ``model(tokens, **batch.model_kwargs())``.

    Attributes:
        tokens: ``[B, S]`` int64 input ids (padding: the dataset's pad id).
        targets: ``[B, S]`` int64, the id each position should predict (the next token), ``-100`` where not
            trained (prompt, padding, the last token of every sample). The sum loss is
            ``cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-100, reduction="sum")``.
        attention_mask: ``[B, S]`` int64, 1 on real tokens, 0 on padding (padded mode), else None.
        position_ids: ``[B, S]`` int64, restarting at 0 for every packed sample (packed mode; the padded tail of
            a row counts from 0 too), else None. Position 0 after the first column starts a new document: the
            model applies document-causal masking.
        num_targets: targets that are not ``-100`` in this batch.
        num_tokens: real (non-padding) tokens in this batch.
        global_num_targets: ``num_targets`` summed over every rank's slice of the global batch (equal to
            ``num_targets`` with one rank): divide a rank's summed loss by it, then sum gradients across ranks,
            for the exact mean over the global batch.
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    num_targets: int
    num_tokens: int
    global_num_targets: int

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        """``{"attention_mask": ...}`` or ``{"position_ids": ...}``, whichever this batch has."""
        out = {}
        if self.attention_mask is not None:
            out["attention_mask"] = self.attention_mask
        if self.position_ids is not None:
            out["position_ids"] = self.position_ids
        return out

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)
        return attrs.evolve(self, tokens=move(self.tokens), targets=move(self.targets),
                            attention_mask=move(self.attention_mask), position_ids=move(self.position_ids))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)


def _targets_of(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[len]`` targets of one sample: ``ids[i+1]`` where ``mask[i+1]``, else -100; the last is -100."""
    out = torch.full_like(ids, IGNORE_INDEX)
    out[:-1] = torch.where(mask[1:], ids[1:], IGNORE_INDEX)
    return out


def collate_padded(samples: Sequence[tuple[torch.Tensor, torch.Tensor]], pad_id: int, *,
                   pad_to_multiple_of: int = 1, max_len: int | None = None) -> Batch:
    """A right-padded batch of ``(ids, mask)`` samples: length = the longest, rounded up to
    ``pad_to_multiple_of`` (but not past ``max_len`` when the longest fits it)."""
    longest = max((len(ids) for ids, _ in samples), default=1)
    width = math.ceil(longest / pad_to_multiple_of) * pad_to_multiple_of
    if max_len is not None:
        width = min(width, max(max_len, longest))
    batch = len(samples)
    tokens = torch.full((batch, width), pad_id, dtype=torch.int64)
    targets = torch.full((batch, width), IGNORE_INDEX, dtype=torch.int64)
    attention = torch.zeros((batch, width), dtype=torch.int64)
    for r, (ids, mask) in enumerate(samples):
        n = len(ids)
        tokens[r, :n] = ids
        targets[r, :n] = _targets_of(ids, mask)
        attention[r, :n] = 1
    count = int((targets != IGNORE_INDEX).sum())
    return Batch(tokens, targets, attention, None, count, int(attention.sum()), count)


def collate_packed(rows: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]], pad_id: int, seq_len: int) -> Batch:
    """A packed batch: each row holds the samples listed for it back to back, padded to ``seq_len``."""
    batch = len(rows)
    tokens = torch.full((batch, seq_len), pad_id, dtype=torch.int64)
    targets = torch.full((batch, seq_len), IGNORE_INDEX, dtype=torch.int64)
    positions = torch.zeros((batch, seq_len), dtype=torch.int64)
    real = 0
    for r, row in enumerate(rows):
        col = 0
        for ids, mask in row:
            n = len(ids)
            if col + n > seq_len:
                raise ValueError(f"samples of {col + n} tokens do not fit a row of {seq_len}")
            tokens[r, col : col + n] = ids
            targets[r, col : col + n] = _targets_of(ids, mask)
            positions[r, col : col + n] = torch.arange(n)
            col += n
        positions[r, col:] = torch.arange(seq_len - col)
        real += col
    count = int((targets != IGNORE_INDEX).sum())
    return Batch(tokens, targets, None, positions, count, real, count)


def pack_rows(lengths: Sequence[int], order: Iterable[int], seq_len: int) -> list[list[int]]:
    """Pack the samples ``order`` lists into rows of at most ``seq_len`` tokens, best-fit decreasing.

    The samples go, longest first (equal lengths in ``order`` order), each into the open row with the least room
    left that still fits it, or into a new row when none does: a few percent of padding or less on typical length
    distributions, where next-fit in ``order`` leaves about a fifth. The samples of a row are listed in ``order``
    order, and the rows come in a random order taken from ``order`` itself: the ``r``-th row opened ranks as
    ``order[r]`` does among ``order[:len(rows)]``. For a shuffled ``order`` that is a random permutation of the
    rows, in effect independent of what they hold, and the rows themselves change with ``order`` (equal lengths
    are taken in its order); without shuffling (``order`` ascending) the rows come longest-first. (Ranking rows
    by their members' smallest position would bias the order: the smallest of ``k`` positions is early, so rows
    of many short samples would come first.)

    The result is a function of ``(lengths, order, seq_len)`` only, so every data-parallel rank and a resumed run
    compute the same rows; the number of rows depends only on the lengths of the samples, not on their order.
    Time: a sort, then O(log seq_len) per sample (a few seconds per million samples).

    Raises ``ValueError`` naming the first sample (in ``order``) longer than ``seq_len``.
    """
    items = list(order)
    sizes = [lengths[i] for i in items]
    if sizes and max(sizes) > seq_len:
        p = next(p for p, n in enumerate(sizes) if n > seq_len)
        raise ValueError(f"sample {items[p]} has {sizes[p]} tokens, more than seq_len={seq_len}")
    # best-fit decreasing over positions in ``order`` (stable sort: equal lengths keep their ``order`` order).
    # Open rows are kept by remaining room: ``rooms`` is the sorted list of distinct rooms > 0 that some row has,
    # ``bucket[room]`` the rows with that room (the last one is used first).
    row_of = [0] * len(items)
    num_rows = 0
    rooms: list[int] = []
    bucket: dict[int, list[int]] = {}
    for p in sorted(range(len(items)), key=sizes.__getitem__, reverse=True):
        n = sizes[p]
        k = bisect.bisect_left(rooms, n)
        if k < len(rooms):
            room = rooms[k]
            rows = bucket[room]
            r = rows.pop()
            if not rows:
                del rooms[k], bucket[room]
        else:
            room, r = seq_len, num_rows
            num_rows += 1
        row_of[p] = r
        room -= n
        if room > 0:
            if room in bucket:
                bucket[room].append(r)
            else:
                bucket[room] = [r]
                bisect.insort(rooms, room)
    out: list[list[int]] = [[] for _ in range(num_rows)]
    for p, i in enumerate(items):
        out[row_of[p]].append(i)
    # not ranked by the members' positions: those depend on what a row holds (see the docstring)
    rank = sorted(range(num_rows), key=items.__getitem__)
    return [out[r] for r in rank]


class DataLoader:
    """Deterministic, resumable batches of a :class:`TokenizedDataset`.

    Each epoch's order is ``torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))`` (or the
    dataset order without ``shuffle``): a function of ``(seed, epoch)`` only. Padded mode takes ``batch_size``
    samples per batch; packed mode packs the epoch's samples best-fit decreasing into rows of ``seq_len`` tokens
    (padded at the end; :func:`pack_rows`: little padding, rows in a random order drawn from the epoch's order,
    different rows each epoch) and takes ``batch_size`` rows per batch. Batches per epoch are the same every
    epoch in both modes.

    Iterating yields the rest of the current epoch and then moves to the next one; :meth:`forever` runs across
    epochs. :meth:`state_dict` after consuming a batch resumes with the batch after it, in a fresh loader too.

    Data parallel: every rank builds the same global batch of ``batch_size`` samples (rows) and keeps rows
    ``rank::world_size`` of it (``batch_size`` must be a multiple of ``world_size``), so the global batch does not
    depend on the number of ranks. The last, partial batch of an epoch (``drop_last=False``) may leave a rank
    with no rows: it gets a batch of zero rows (``[0, S]``; the model runs on it and the summed loss is 0, so
    run the step anyway and collectives stay matched; or use ``drop_last=True``).
    ``Batch.global_num_targets`` counts the targets of the whole global batch.

    ``fixed_shape`` (packed mode only): a short last batch is filled up with empty rows (all padding, no
    targets), so every batch of every rank is ``[batch_size / world_size, seq_len]``: one shape, so a compiled
    model compiles once instead of again for the last batch.
    """

    def __init__(
        self,
        dataset: TokenizedDataset,
        batch_size: int,
        *,
        packing: bool = False,
        seq_len: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        pad_to_multiple_of: int = 1,
        fixed_shape: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be a multiple of world_size {world_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.packing = packing
        self.seq_len = seq_len or dataset.seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.pad_to_multiple_of = pad_to_multiple_of
        if fixed_shape and not packing:
            raise ValueError("fixed_shape needs packing=True (padded batches are as long as their longest sample)")
        self.fixed_shape = fixed_shape
        self.epoch = 0
        self.batch_index = 0
        self._lengths = dataset.lengths.tolist()
        if packing and self._lengths and max(self._lengths) > self.seq_len:
            raise ValueError(f"the dataset has samples of {max(self._lengths)} tokens, more than seq_len="
                             f"{self.seq_len}; tokenize with seq_len <= {self.seq_len}")
        self._plan_cache: tuple[int, list[list[Any]]] | None = None

    # ---- plan ------------------------------------------------------------------------------------------------
    def order(self, epoch: int) -> list[int]:
        """Sample indices in the order of ``epoch``."""
        n = len(self.dataset)
        if not self.shuffle:
            return list(range(n))
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def _plan(self, epoch: int) -> list[list[Any]]:
        """Global batches of ``epoch``: lists of sample indices (padded) or of rows of sample indices (packed)."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        units: list[Any] = self.order(epoch)
        if self.packing:
            units = pack_rows(self._lengths, units, self.seq_len)
        batches = [units[i : i + self.batch_size] for i in range(0, len(units), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        self._plan_cache = (epoch, batches)
        return batches

    def num_batches(self, epoch: int | None = None) -> int:
        """Batches in ``epoch`` (default: the current one)."""
        return len(self._plan(self.epoch if epoch is None else epoch))

    @property
    def batches_per_epoch(self) -> int:
        """Batches in the current epoch (the same every epoch: packed, the row count depends only on the lengths)."""
        return self.num_batches()

    def __len__(self) -> int:
        return self.batches_per_epoch

    def total_batches(self, epochs: int) -> int:
        """Batches in epochs ``0 .. epochs-1`` (for a learning-rate schedule; every epoch has as many)."""
        return epochs * self.num_batches(0) if epochs > 0 else 0

    def batch(self, epoch: int, index: int) -> Batch:
        """This rank's slice of global batch ``index`` of ``epoch`` (random access; no state change)."""
        units = self._plan(epoch)[index]
        if self.packing:
            rows = [[self.dataset[i] for i in row] for row in units]
            if self.fixed_shape:
                rows += [[] for _ in range(self.batch_size - len(rows))]
            mine = collate_packed(rows[self.rank :: self.world_size], self.dataset.pad_id, self.seq_len)
            if self.world_size == 1:
                return mine
            whole = collate_packed(rows, self.dataset.pad_id, self.seq_len)
        else:
            samples = [self.dataset[i] for i in units]
            kwargs = {"pad_to_multiple_of": self.pad_to_multiple_of, "max_len": self.seq_len}
            mine = collate_padded(samples[self.rank :: self.world_size], self.dataset.pad_id, **kwargs)
            if self.world_size == 1:
                return mine
            whole = collate_padded(samples, self.dataset.pad_id, **kwargs)
        return attrs.evolve(mine, global_num_targets=whole.num_targets)

    # ---- iteration -------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        """The remaining batches of the current epoch; afterwards the loader is at the start of the next."""
        self._normalize()
        epoch = self.epoch
        n = self.num_batches(epoch)
        while self.epoch == epoch and self.batch_index < n:
            index = self.batch_index
            self.batch_index += 1
            yield self.batch(epoch, index)
        if self.epoch == epoch:
            self.epoch, self.batch_index = epoch + 1, 0

    def forever(self) -> Iterator[Batch]:
        """Batches across epochs without end (a step-based loop takes what it needs)."""
        if not len(self.dataset) or self.num_batches() == 0:
            raise DataError("the data loader has no batches (dataset smaller than one batch with drop_last?)")
        while True:
            yield from self

    def _normalize(self) -> None:
        if self.batch_index >= self.num_batches(self.epoch):
            self.epoch, self.batch_index = self.epoch + 1, 0

    # ---- state -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batch_index"}``: the next batch to yield."""
        self._normalize()
        return {"epoch": self.epoch, "batch_index": self.batch_index}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume at ``state`` (from :meth:`state_dict` of a loader with the same data, seed and sizes)."""
        epoch, index = int(state["epoch"]), int(state["batch_index"])
        if epoch < 0 or index < 0 or index > self.num_batches(epoch):
            raise ValueError(f"invalid data loader state {dict(state)} ({self.num_batches(epoch)} batches in "
                             f"epoch {epoch})")
        self.epoch, self.batch_index = epoch, index


# ---------------------------------------------------------------------------------------------- preference data

MIN_PROMPT_TOKENS = 16
"""When a response alone does not fit ``seq_len``, the prompt keeps this many tokens (or all of it, if fewer; at
most ``seq_len // 2``) and the response is cut at its end."""


@attrs.define
class PreferenceStats:
    """What tokenizing preference data kept, cut and dropped.

    Attributes:
        rows: rows read.
        samples: pairs kept (paired data) or samples kept (unpaired data).
        desirable: unpaired data: kept samples labelled desirable (``label`` true); the rest are undesirable.
        skipped: malformed rows skipped (``skip_bad=True``).
        skipped_examples: ``"where: problem"`` for the first few skipped rows.
        truncated_prompts: rows whose prompt was cut from the left to fit ``seq_len``.
        truncated_responses: responses cut at their end (a response alone longer than ``seq_len`` minus a
            minimal prompt); a pair may count twice.
        dropped: rows dropped because a response had no trained token left after truncation.
        tokens: tokens in the kept samples (chosen and rejected both counted).
        trained_tokens: response tokens (the mask) in the kept samples.
        paired: whether the data is pairs (else unpaired samples).
    """

    rows: int = 0
    samples: int = 0
    desirable: int = 0
    skipped: int = 0
    skipped_examples: list[str] = attrs.field(factory=list)
    truncated_prompts: int = 0
    truncated_responses: int = 0
    dropped: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    paired: bool = True

    def summary(self) -> str:
        if self.paired:
            what = f"{self.samples} pairs"
        else:
            what = (f"{self.samples} samples ({self.desirable} desirable, {self.samples - self.desirable} "
                    "undesirable)")
        text = f"{what} from {self.rows} rows, {self.tokens} tokens ({self.trained_tokens} in responses)"
        notes = [f"{n} {what}" for n, what in ((self.skipped, "bad rows skipped"),
                                               (self.truncated_prompts, "prompts truncated"),
                                               (self.truncated_responses, "responses truncated"),
                                               (self.dropped, "dropped with no response tokens")) if n]
        return text + ("; " + ", ".join(notes) if notes else "")


@attrs.frozen(eq=False)
class PreferenceDataset:
    """Tokenized preference data: pairs (DPO and its variants) or labelled samples (KTO).

    Every sample is ``prompt + response`` with the mask True on the response tokens only (the template's
    end-of-turn token after it included, as its assistant mask has it); tokens the template writes after that
    are dropped. The prompt is the tokens before the first trained token.

    Attributes:
        chosen: paired: prompt + chosen response per pair; unpaired: prompt + completion per sample.
        rejected: paired: prompt + rejected response, aligned with ``chosen`` by index, with the same prompt
            tokens; unpaired: None.
        labels: unpaired: ``[n]`` bool, True for desirable completions; paired: None.
        stats: :class:`PreferenceStats`.
        bos_id: the tokenizer's bos id (a leading bos is kept when a prompt is cut from the left), or None.
    """

    chosen: TokenizedDataset
    rejected: TokenizedDataset | None
    labels: torch.Tensor | None
    stats: PreferenceStats = attrs.field(factory=PreferenceStats)
    bos_id: int | None = None

    def __attrs_post_init__(self):
        if (self.rejected is None) == (self.labels is None):
            raise ValueError("a PreferenceDataset has either rejected samples (paired) or labels (unpaired)")
        other = self.rejected if self.rejected is not None else self.labels
        if len(other) != len(self.chosen):
            raise ValueError(f"{len(self.chosen)} chosen samples but {len(other)} rejected samples / labels")

    def __len__(self) -> int:
        """Pairs (paired) or samples (unpaired)."""
        return len(self.chosen)

    @property
    def paired(self) -> bool:
        return self.rejected is not None

    @property
    def seq_len(self) -> int:
        return self.chosen.seq_len

    @property
    def pad_id(self) -> int:
        return self.chosen.pad_id

    @property
    def lengths(self) -> torch.Tensor:
        """``[n]`` int64: the longer sample's token count of each pair (the sample's, unpaired)."""
        if self.rejected is None:
            return self.chosen.lengths
        return torch.maximum(self.chosen.lengths, self.rejected.lengths)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors that define the content (ids, masks, offsets of both sides, or labels)."""
        c, r = self.chosen, self.rejected
        tail = (r.ids, r.mask, r.offsets) if r is not None else (self.labels,)
        return (c.ids, c.mask, c.offsets, *tail)

    def subset(self, indices: Iterable[int]) -> PreferenceDataset:
        """The pairs (samples) at ``indices``, in that order; stats recounted for them (row counts kept)."""
        indices = [int(i) for i in indices]
        chosen = self.chosen.subset(indices)
        rejected = self.rejected.subset(indices) if self.rejected is not None else None
        labels = self.labels[torch.tensor(indices, dtype=torch.int64)] if self.labels is not None else None
        parts = [d for d in (chosen, rejected) if d is not None]
        stats = attrs.evolve(self.stats, samples=len(indices), tokens=sum(d.num_tokens for d in parts),
                             trained_tokens=sum(d.num_targets for d in parts),
                             desirable=int(labels.sum()) if labels is not None else 0)
        return attrs.evolve(self, chosen=chosen, rejected=rejected, labels=labels, stats=stats)

    def prompt_length(self, index: int) -> int:
        """Tokens of sample ``index``'s prompt (before its first trained token)."""
        _, mask = self.chosen[index]
        return int(mask.int().argmax())

    def kl_sample(self, prompt_index: int, completion_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, mask)``: the prompt of sample ``prompt_index`` with the completion of ``completion_index``
        (KTO's mismatched pair), fitted to ``seq_len`` as tokenizing fits samples."""
        ids, _ = self.chosen[prompt_index]
        prompt = ids[: self.prompt_length(prompt_index)].tolist()
        ids, mask = self.chosen[completion_index]
        start = self.prompt_length(completion_index)
        fitted = _fit(prompt, [(ids[start:].tolist(), mask[start:].tolist())], self.seq_len, self.bos_id)
        (response, response_mask), = fitted.responses
        return (torch.tensor(fitted.prompt + response, dtype=torch.int64),
                torch.tensor([False] * len(fitted.prompt) + response_mask, dtype=torch.bool))


def detect_paired(rows: Sequence[Row], columns: Mapping[str, str] | None = None) -> bool:
    """Whether preference ``rows`` are paired, from the first parsed row: a ``chosen`` column -> paired;
    else a ``completion`` column -> unpaired (KTO); else DataError."""
    columns = columns or {}
    first = next((r for r in rows if r.data is not None), None)
    if first is None:
        raise DataError("cannot detect the preference layout: no row could be parsed"
                        + (f" (first: {rows[0].where}: {rows[0].error})" if rows else ""))
    keys = first.data.keys()
    if columns.get("chosen", "chosen") in keys:
        return True
    if columns.get("completion", "completion") in keys:
        return False
    raise DataError(f"{first.where}: cannot tell the preference layout from columns {sorted(map(str, keys))}; "
                    "expected 'chosen' and 'rejected' (pairs) or 'completion' and 'label' (unpaired, KTO); "
                    "map yours with columns")


def _label(data: Mapping[str, Any], fmt: Format) -> bool:
    column = fmt.column("label")
    value = data.get(column)
    if value is None:
        raise _BadRow(f"missing field {column!r} (the row has: {', '.join(map(str, list(data)[:10]))})")
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise _BadRow(f"field {column!r} should be true/false (or 1/0), got {value!r}")


def _prompt_messages(data: Mapping[str, Any], fmt: Format, from_csv: bool) -> list[dict[str, str]]:
    """The ``prompt`` field as messages: a string is one user turn; a message list is taken as is."""
    column = fmt.column("prompt")
    value = _cell(data.get(column), from_csv)
    if value is None:
        raise _BadRow(f"missing field {column!r} (the row has: {', '.join(map(str, list(data)[:10]))})")
    if isinstance(value, str):
        if not value.strip():
            raise _BadRow(f"empty field {column!r}")
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        messages = _parse_messages(value, column)
        if not messages:
            raise _BadRow(f"empty field {column!r}")
        return messages
    raise _BadRow(f"field {column!r} should be a string or a list of messages, got {_type_name(value)}")


def _cell(value: Any, from_csv: bool) -> Any:
    """A CSV cell holding a JSON array (a message list) decoded; anything else unchanged."""
    if from_csv and isinstance(value, str) and value.lstrip().startswith("["):
        try:
            decoded = _json_loads(value)
        except json.JSONDecodeError:
            return value
        return decoded if isinstance(decoded, list) else value
    return value


def _conversation(data: Mapping[str, Any], fmt: Format, name: str, from_csv: bool) -> list[dict[str, str]]:
    """Prompt + response of the response field ``name`` (``chosen``, ``rejected``, ``completion``), ending with
    the assistant's response; system prompt and folding applied."""
    column = fmt.column(name)
    label = repr(column) if column == name else f"{column!r} ({name})"
    value = _cell(data.get(column), from_csv)
    if value is None:
        raise _BadRow(f"missing field {label} (the row has: {', '.join(map(str, list(data)[:10]))})")
    if isinstance(value, str):
        messages = [*_prompt_messages(data, fmt, from_csv), {"role": "assistant", "content": value}]
    elif isinstance(value, list):
        messages = _parse_messages(value, column)
        if not messages or messages[0]["role"] == "assistant":  # the response only: the prompt is `prompt`
            messages = _prompt_messages(data, fmt, from_csv) + messages
    else:
        raise _BadRow(f"field {label} should be a string or a list of messages, got {_type_name(value)}")
    if messages[-1]["role"] != "assistant":
        raise _BadRow(f"the last message of {label} is a {messages[-1]['role']} message, expected the "
                      "assistant's response")
    if not messages[-1]["content"].strip():
        raise _BadRow(f"empty response in {label}")
    if len(messages) < 2:
        raise _BadRow(f"{label} has no prompt before the response")
    system = _field(data, fmt, "system", required=False) or fmt.system_prompt
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return _folded(messages) if fmt.fold_system else messages


def _preference_conversations(data: Mapping[str, Any], fmt: Format, paired: bool,
                              from_csv: bool) -> list[list[dict[str, str]]]:
    """``[chosen, rejected]`` (sharing every message but the last) or ``[completion]`` conversations of a row."""
    if not paired:
        return [_conversation(data, fmt, "completion", from_csv)]
    chosen = _conversation(data, fmt, "chosen", from_csv)
    rejected = _conversation(data, fmt, "rejected", from_csv)
    names = f"{fmt.column('chosen')!r} and {fmt.column('rejected')!r}"
    if chosen[:-1] != rejected[:-1]:
        differ = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), None)
        where = f"message {differ} differs" if differ is not None else "different numbers of messages"
        raise _BadRow(f"{names} do not share the prompt before the response ({where})")
    if chosen[-1]["content"] == rejected[-1]["content"]:
        raise _BadRow(f"{names} are the same response")
    return [chosen, rejected]


def _response_span(ids: list[int], mask: list[bool]) -> tuple[int, int]:
    """``(start, end)`` of the last run of trained tokens: the final assistant response and its end of turn."""
    end = len(mask)
    while end and not mask[end - 1]:
        end -= 1
    if not end:
        raise _BadRow("the response has no tokens after the chat template")
    start = end
    while start and mask[start - 1]:
        start -= 1
    return start, end


@attrs.frozen
class _Fitted:
    prompt: list[int]
    responses: list[tuple[list[int], list[bool]]]
    prompt_cut: bool
    responses_cut: int


def _fit(prompt: list[int], responses: list[tuple[list[int], list[bool]]], seq_len: int,
         bos_id: int | None) -> _Fitted:
    """Cut ``prompt + response`` to ``seq_len`` for every response, keeping one prompt for all: the prompt loses
    tokens from the left (a leading bos stays) to make room for the longest response; a response that does not
    fit beside :data:`MIN_PROMPT_TOKENS` of prompt is cut at its end."""
    longest = max(len(ids) for ids, _ in responses)
    keep = min(len(prompt), max(seq_len - longest, min(MIN_PROMPT_TOKENS, seq_len // 2)))
    room = seq_len - keep
    cut = [(ids[:room], mask[:room]) for ids, mask in responses]
    responses_cut = sum(len(ids) > room for ids, _ in responses)
    if keep == len(prompt):
        return _Fitted(prompt, cut, False, responses_cut)
    if bos_id is not None and prompt and prompt[0] == bos_id and keep > 0:
        kept = [bos_id] + (prompt[len(prompt) - keep + 1:] if keep > 1 else [])
    else:
        kept = prompt[len(prompt) - keep:]
    return _Fitted(kept, cut, True, responses_cut)


def _encode_preference(conversations: list[list[dict[str, str]]], tokenizer: TokenizerLike,
                       seq_len: int) -> tuple[list[int], list[tuple[list[int], list[bool]]]]:
    """``(prompt ids, [(response ids, response mask)])`` of one row's conversations, one shared prompt.

    The prompt is the tokens the conversations share before their responses (normally all of them; a tokenizer
    may merge the prompt's last characters with the response's first differently in each); the tokens between it
    and a response's trained tokens belong to that response, untrained.
    """
    encoded = []
    for messages in conversations:
        bounded = [{**m, "content": _bounded(m["content"], tokenizer, seq_len, keep_end=True)}
                   for m in messages[:-1]]
        last = messages[-1]
        bounded.append({**last, "content": _bounded(last["content"], tokenizer, seq_len)})
        try:
            ids, mask = tokenizer.encode_chat(bounded)
        except ValueError as e:
            raise _BadRow(f"chat template: {e}") from e
        ids = list(ids)
        encoded.append((ids, *_response_span(ids, [bool(m) for m in mask])))
    shared = min(start for _, start, _ in encoded)
    first = encoded[0][0]
    for ids, _, _ in encoded[1:]:
        shared = next((i for i in range(shared) if ids[i] != first[i]), shared)
    if shared == 0:
        raise _BadRow("the chat template writes nothing before the response")
    responses = [(ids[shared:end], [False] * (start - shared) + [True] * (end - start))
                 for ids, start, end in encoded]
    return first[:shared], responses


def tokenize_preferences(
    rows: Iterable[Row],
    tokenizer: TokenizerLike,
    seq_len: int = 2048,
    *,
    paired: bool | None = None,
    columns: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
    template: str | None = None,
    fold_system: bool = False,
    skip_bad: bool = False,
    allow_empty: bool = False,
) -> PreferenceDataset:
    """Preference ``rows`` tokenized through the chat template into a :class:`PreferenceDataset`.

    Layouts (see the module docstring): pairs (``prompt`` / ``chosen`` / ``rejected``, strings or message lists)
    or, unpaired, ``prompt`` / ``completion`` / ``label``. ``paired`` None detects the layout from the first row
    (:func:`detect_paired`); True / False demands it. Samples longer than ``seq_len`` are cut as the module
    docstring says (prompt from the left, the same prompt for both sides of a pair) and counted. A malformed row raises :class:`DataError` (``"file:line: problem"``)
    unless ``skip_bad``, which skips and counts it; no pair left raises DataError unless ``allow_empty``.
    """
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    rows = list(rows)
    fmt = Format("preference", columns or {}, system_prompt, template, False, fold_system)
    if paired is None:
        paired = detect_paired(rows, fmt.columns)
    tokenizer = chat_tokenizer(tokenizer, fmt.template)
    stats = PreferenceStats(rows=len(rows), paired=paired)
    sides: list[list[tuple[list[int], list[bool]]]] = [[], []] if paired else [[]]
    labels: list[bool] = []
    for row in rows:
        try:
            if row.error is not None:
                raise _BadRow(row.error)
            label = _label(row.data, fmt) if not paired else None
            conversations = _preference_conversations(row.data, fmt, paired, row.file.lower().endswith(".csv"))
            prompt, responses = _encode_preference(conversations, tokenizer, seq_len)
        except _BadRow as e:
            if not skip_bad:
                raise DataError(f"{row.where}: {e} (set skip_bad to skip bad rows)") from None
            stats.skipped += 1
            if len(stats.skipped_examples) < 10:
                stats.skipped_examples.append(f"{row.where}: {e}")
            continue
        fitted = _fit(prompt, responses, seq_len, tokenizer.bos_id)
        stats.truncated_prompts += fitted.prompt_cut
        stats.truncated_responses += fitted.responses_cut
        if not all(any(mask) for _, mask in fitted.responses):
            stats.dropped += 1
            continue
        for side, (ids, mask) in zip(sides, fitted.responses):
            side.append((fitted.prompt + ids, [False] * len(fitted.prompt) + mask))
        if label is not None:
            labels.append(label)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    parts = [TokenizedDataset.from_samples(side, seq_len, pad_id) for side in sides]
    stats.samples = len(parts[0])
    stats.desirable = sum(labels)
    stats.tokens = sum(d.num_tokens for d in parts)
    stats.trained_tokens = sum(d.num_targets for d in parts)
    data = PreferenceDataset(parts[0], parts[1] if paired else None,
                             None if paired else torch.tensor(labels, dtype=torch.bool), stats, tokenizer.bos_id)
    if not len(data) and not allow_empty:
        where = rows[0].file if rows else "the dataset"
        detail = f"; first skipped: {stats.skipped_examples[0]}" if stats.skipped_examples else ""
        raise DataError(f"{where}: no usable preference samples ({stats.summary()}){detail}")
    return data


def load_preference_datasets(config: Any, tokenizer: TokenizerLike, *, paired: bool | None = None,
                             seq_len: int | None = None,
                             seed: int | None = None) -> tuple[PreferenceDataset, PreferenceDataset | None]:
    """``(train, val or None)`` of preference data (``config.format == "preference"``), validation found as
    :func:`load_datasets` finds it; ``paired`` as in :func:`tokenize_preferences` (the validation data must have
    the training data's layout)."""
    if getattr(config, "format", None) != "preference":
        raise DataError(f"preference data needs data.format = 'preference', got {getattr(config, 'format', None)!r}")
    if getattr(config, "train_on_input", False):
        raise DataError("train_on_input does not apply to preference data (only responses are scored)")
    seq_len = seq_len if seq_len is not None else getattr(config, "seq_len", 2048)
    fmt = format_of(config)
    layout = {"paired": paired}

    def tokenize(rows: list[Row]) -> PreferenceDataset:
        data = tokenize_preferences(rows, tokenizer, seq_len, paired=layout["paired"], columns=fmt.columns,
                                    system_prompt=fmt.system_prompt, template=fmt.template,
                                    fold_system=fmt.fold_system, skip_bad=bool(getattr(config, "skip_bad", False)))
        layout["paired"] = data.paired
        return data

    return _train_and_validation(config, tokenize, seed)


@attrs.frozen(eq=False)
class PreferenceBatch:
    """One batch of preference data for ``model(tokens, **batch.model_kwargs())``; targets as in :class:`Batch`.

    Attributes:
        tokens: ``[R, S]`` int64. Paired: ``R = 2 * num_pairs``, the chosen samples first, then the rejected
            ones (rows ``i`` and ``num_pairs + i`` are one pair), so one forward scores both. Unpaired:
            ``R = num_pairs`` samples.
        targets: ``[R, S]`` int64, the next token where it is a response token, else ``-100``.
        attention_mask: ``[R, S]`` int64, 1 on real tokens.
        labels: unpaired: ``[R]`` bool (True: desirable); paired: None.
        kl_tokens, kl_targets, kl_attention_mask: unpaired: ``[R, S']`` KTO's mismatched samples: row ``j`` is
            the prompt of global-batch sample ``g`` with the completion of global-batch sample ``(g - 1) mod n``
            (``g`` = this rank's ``j``-th sample, ``n`` = the global batch size), as TRL's KTOTrainer pairs them;
            paired: None.
        num_pairs: pairs in this batch (paired), or samples (unpaired).
        num_tokens: real tokens in ``tokens``.
        global_num_pairs: ``num_pairs`` summed over every rank's slice of the global batch: divide a rank's
            summed loss by it, then sum gradients across ranks, for the exact mean over the global batch.
        indices: ``[num_pairs]`` int64 dataset indices of this batch's pairs (samples).
        global_indices: ``[global_num_pairs]`` int64 dataset indices of the whole global batch.
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    attention_mask: torch.Tensor
    num_pairs: int
    num_tokens: int
    global_num_pairs: int
    indices: torch.Tensor
    labels: torch.Tensor | None = None
    kl_tokens: torch.Tensor | None = None
    kl_targets: torch.Tensor | None = None
    kl_attention_mask: torch.Tensor | None = None
    global_indices: torch.Tensor | None = None

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        """``{"attention_mask": ...}`` for the forward of ``tokens``."""
        return {"attention_mask": self.attention_mask}

    def kl_model_kwargs(self) -> dict[str, torch.Tensor]:
        """``{"attention_mask": ...}`` for the forward of ``kl_tokens``."""
        return {"attention_mask": self.kl_attention_mask}

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PreferenceBatch:
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)
        names = ("tokens", "targets", "attention_mask", "labels", "kl_tokens", "kl_targets", "kl_attention_mask")
        return attrs.evolve(self, **{name: move(getattr(self, name)) for name in names})


class PreferenceLoader(DataLoader):
    """Deterministic, resumable batches of a :class:`PreferenceDataset`: :class:`DataLoader`'s order, epochs,
    resume state and data-parallel slicing, over pairs (samples, unpaired). ``batch_size`` is pairs per global
    batch; every rank keeps pairs ``rank::world_size`` of it, both rows of a pair on the same rank. Padded
    batches only."""

    def __init__(self, dataset: PreferenceDataset, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1, pad_to_multiple_of: int = 1):
        super().__init__(dataset, batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last, rank=rank,
                         world_size=world_size, pad_to_multiple_of=pad_to_multiple_of)

    def batch(self, epoch: int, index: int) -> PreferenceBatch:
        """This rank's slice of global batch ``index`` of ``epoch`` (random access; no state change)."""
        data: PreferenceDataset = self.dataset
        units = self._plan(epoch)[index]
        mine = units[self.rank :: self.world_size]
        collate = lambda samples: collate_padded(samples, data.pad_id, pad_to_multiple_of=self.pad_to_multiple_of,
                                                 max_len=self.seq_len)
        indices = torch.tensor(mine, dtype=torch.int64)
        global_indices = torch.tensor(units, dtype=torch.int64)
        if data.rejected is not None:
            rows = collate([data.chosen[i] for i in mine] + [data.rejected[i] for i in mine])
            return PreferenceBatch(rows.tokens, rows.targets, rows.attention_mask, len(mine), rows.num_tokens,
                                   len(units), indices, global_indices=global_indices)
        rows = collate([data.chosen[i] for i in mine])
        n = len(units)
        kl = collate([data.kl_sample(units[g], units[(g - 1) % n]) for g in range(self.rank, n, self.world_size)])
        return PreferenceBatch(rows.tokens, rows.targets, rows.attention_mask, len(mine), rows.num_tokens, n,
                               indices, data.labels[indices], kl.tokens, kl.targets, kl.attention_mask,
                               global_indices)


# ------------------------------------------------------------------------------------------------------ prompts


@attrs.define
class PromptStats:
    """What tokenizing prompt rows kept and dropped (``too_long``: prompts that leave no room to answer)."""

    rows: int = 0
    prompts: int = 0
    skipped: int = 0
    skipped_examples: list[str] = attrs.field(factory=list)
    too_long: int = 0

    def summary(self) -> str:
        notes = [f"{n} {what}" for n, what in ((self.skipped, "bad rows skipped"),
                                               (self.too_long, "dropped: longer than seq_len - max_new_tokens")) if n]
        return f"{self.prompts} prompts from {self.rows} rows" + ("; " + ", ".join(notes) if notes else "")


@attrs.frozen(eq=False)
class PromptDataset:
    """Prompts for sampling (RL): token ids through the chat template with the generation prompt, each row's other
    columns (what reward functions read), its prompt as given (a string or a message list) and where it came from.

    Attributes:
        ids: per prompt, ``list[int]``.
        prompts: per prompt, the row's prompt value (a string, or a list of messages).
        columns: per prompt, the row's other columns (``dict``).
        where: per prompt, ``"file:line"``.
        stats: :class:`PromptStats`.
    """

    ids: list[list[int]]
    prompts: list[Any]
    columns: list[dict[str, Any]]
    where: list[str]
    stats: PromptStats = attrs.field(factory=PromptStats)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: Iterable[int]) -> PromptDataset:
        indices = [int(i) for i in indices]
        return PromptDataset([self.ids[i] for i in indices], [self.prompts[i] for i in indices],
                             [self.columns[i] for i in indices], [self.where[i] for i in indices],
                             attrs.evolve(self.stats, prompts=len(indices)))

    def as_tokenized(self, seq_len: int, pad_id: int) -> TokenizedDataset:
        """The prompt ids as a :class:`TokenizedDataset` (for :class:`DataLoader`'s order, epochs and resume, and
        the data fingerprint)."""
        return TokenizedDataset.from_samples([(ids, [True] * len(ids)) for ids in self.ids], seq_len, pad_id)


def tokenize_prompts(rows: Iterable[Row], tokenizer: TokenizerLike, max_prompt_tokens: int, *,
                     columns: Mapping[str, str] | None = None, system_prompt: str | None = None,
                     template: str | None = None, fold_system: bool = False, skip_bad: bool = False,
                     allow_empty: bool = False) -> PromptDataset:
    """Prompt rows -> :class:`PromptDataset`. A row's ``prompt`` (``columns`` maps another name) is a string (one
    user turn) or a chat message list ending with a user turn; it goes through the chat template with the
    generation prompt, ``system_prompt`` / ``fold_system`` as for sft. Prompts longer than
    ``max_prompt_tokens`` are dropped and counted; malformed rows are DataError ``"file:line: problem"`` unless
    ``skip_bad``."""
    rows = list(rows)
    column = dict(columns or {}).get("prompt", "prompt")
    tokenizer = chat_tokenizer(tokenizer, template)
    stats = PromptStats(rows=len(rows))
    out = PromptDataset([], [], [], [], stats)
    for row in rows:
        try:
            if row.error is not None:
                raise _BadRow(row.error)
            value = row.data.get(column)
            if isinstance(value, str):
                if not value.strip():
                    raise _BadRow(f"empty field {column!r}")
                messages = [{"role": "user", "content": value}]
            elif value is None:
                raise _BadRow(f"missing field {column!r} (the row has: {', '.join(map(str, list(row.data)[:10]))})")
            else:
                messages = _parse_messages(value, column)
                if not messages or messages[-1]["role"] != "user":
                    raise _BadRow(f"field {column!r}: the last message must be the user's (the prompt to answer)")
            if system_prompt and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": system_prompt})
            if fold_system:
                messages = _folded(messages)
            try:
                ids = list(tokenizer.encode_chat(messages, add_generation_prompt=True)[0])
            except ValueError as e:
                raise _BadRow(f"chat template: {e}") from e
        except _BadRow as e:
            if not skip_bad:
                raise DataError(f"{row.where}: {e} (set skip_bad to skip bad rows)") from None
            stats.skipped += 1
            if len(stats.skipped_examples) < 10:
                stats.skipped_examples.append(f"{row.where}: {e}")
            continue
        if len(ids) > max_prompt_tokens:
            stats.too_long += 1
            continue
        out.ids.append(ids)
        out.prompts.append(value)
        out.columns.append({k: v for k, v in row.data.items() if k != column})
        out.where.append(row.where)
    stats.prompts = len(out)
    if not len(out) and not allow_empty:
        where = rows[0].file if rows else "the dataset"
        raise DataError(f"{where}: no usable prompts ({stats.summary()})")
    return out


def load_prompt_datasets(config: Any, tokenizer: TokenizerLike, max_prompt_tokens: int, *,
                         seed: int | None = None) -> tuple[PromptDataset, PromptDataset | None]:
    """``(train, val or None)`` of prompt data (``config.format == "prompt"``), validation found as
    :func:`load_datasets` finds it."""
    if getattr(config, "format", None) != "prompt":
        raise DataError(f"prompt data needs data.format = 'prompt', got {getattr(config, 'format', None)!r}")
    fmt = format_of(config)

    def tokenize(rows: list[Row]) -> PromptDataset:
        return tokenize_prompts(rows, tokenizer, max_prompt_tokens, columns=fmt.columns,
                                system_prompt=fmt.system_prompt, template=fmt.template, fold_system=fmt.fold_system,
                                skip_bad=bool(getattr(config, "skip_bad", False)))

    return _train_and_validation(config, tokenize, seed)
