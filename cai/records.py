"""JSONL record store and the input formats people already have.

Records are JSON objects, one a line, each with a stable string `id`.

- `read_jsonl` / `read_prompts` / `read_preferences` read inputs; a malformed line fails with `file:line`.
- `RecordWriter` appends records one at a time (flush + fsync each), so a killed run keeps every record
  it finished; re-opening it skips ids already written and repairs a torn last line left by the kill.
- Format adapters: hh-rlhf transcripts (`"\\n\\nHuman: ...\\n\\nAssistant: ..."`), trl's conversational
  preference format, chat `messages`, CSV/JSONL prompt sets with a prompt-like column.
- `mix_preferences` builds the human/AI training mix shared by `cai pm train` and `cai dpo`.

A conversation is a list of `{"role": "system"|"user"|"assistant", "content": str}` messages. A prompt
is either a plain string (one user turn) or such a list; `as_messages` turns either into a list.
"""

import csv
import glob
import hashlib
import io
import json
import logging
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai import paths
from cai.errors import RecordsError
from cai.paths import local_or_bundled

# Columns that hold the prompt in the prompt sets people already have (ours, Alpaca-style, AdvBench,
# HarmBench, StrongREJECT, plain QA sets), tried in this order.
PROMPT_COLUMNS = ("prompt", "instruction", "goal", "Behavior", "forbidden_prompt", "question")

Message = dict[str, str]

log = logging.getLogger("cai")


class MalformedRow(RecordsError):
    """A row of published data that breaks its own format (`reason` says how); readers skip a few."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


# ----------------------------------------------------------------------------- reading


JSONL_FILE = "JSONL file (one JSON object a line)"


def read_jsonl(path: str | Path, *, line_hint: str = "each line must be one JSON object", allow_nan: bool = False
               ) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(line_number, object)` for each non-blank line of a JSONL file (`.jsonl.gz` too); a line
    that is not a JSON object fails with `file:line`, the last one included: a file cut short is an error,
    not a record to drop. (A torn line that a kill leaves in cai's own output is `RecordWriter`'s to
    repair when the stage resumes; files written whole go through `write_jsonl`, which is atomic.)

    The file is read a line at a time, each line at most CAI_MAX_LINE_MB and the whole (unpacked) at most
    CAI_MAX_INPUT_MB, so a runaway line or file fails with its size instead of filling memory. NaN and
    Infinity fail too, unless `allow_nan` (cai's own metric logs, where a diverged step logs NaN)."""
    path = Path(path)
    line_cap, file_cap = paths.line_limit(), paths.input_limit()
    with paths.open_input(path, RecordsError, JSONL_FILE) as handle:
        stream = handle
        if path.suffix.lower() == ".gz":
            import gzip

            stream = gzip.GzipFile(fileobj=handle)
        number = total = 0
        while True:
            try:
                line = stream.readline(line_cap + 1)
            except (OSError, EOFError) as exc:  # a damaged or truncated .gz
                raise RecordsError(f"{path}: not a complete gzip file ({exc}) -- download or compress it again"
                                   ) from None
            if not line:
                return
            number += 1
            total += len(line)
            if total > file_cap:
                raise RecordsError(paths.too_big(path, -1, file_cap, "CAI_MAX_INPUT_MB", "the unpacked file"))
            terminated = line.endswith(b"\n")
            if len(line) > line_cap and not terminated:
                raise RecordsError(paths.too_big(f"{path}:{number}", -1, line_cap, "CAI_MAX_LINE_MB", "the line"))
            if not line.strip():
                continue
            text = paths.decode_utf8(line, path, RecordsError, first_line=number)  # a byte order mark is dropped
            try:
                obj = json.loads(text, parse_constant=None if allow_nan else _refuse_constant)
            except _NonFinite as exc:
                raise RecordsError(f"{path}:{number}: {exc} is not a number JSON allows -- write a number, or "
                                   "null where a value is missing") from None
            except json.JSONDecodeError as exc:
                cut = "" if terminated else " (the last line has no newline: was the file cut short?)"
                raise RecordsError(f"{path}:{number}: not valid JSON ({exc.msg}){cut} -- {line_hint}") from None
            except RecursionError:
                raise RecordsError(f"{path}:{number}: JSON nested too deeply to read -- {line_hint}, with "
                                   "lists and objects nested a few levels at most") from None
            if not isinstance(obj, dict):
                raise RecordsError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__} -- {line_hint}")
            yield number, obj


class _NonFinite(ValueError):
    """NaN or Infinity in a JSON line: Python's reader takes them, JSON does not, and a NaN compares false
    with everything, so it would pass range checks and poison means."""


def _refuse_constant(name: str):
    raise _NonFinite(name)


def stable_id(prefix: str, text: str) -> str:
    """An id derived from content, so the same input gets the same id in every run."""
    return f"{prefix}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:12]}"


def as_messages(prompt: str | list[Message]) -> list[Message]:
    """A prompt as a conversation: a string becomes one user turn, a message list is copied."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def prompt_text(prompt: str | list[Message]) -> str:
    """The last user turn of a prompt: what a person would call "the request"."""
    if isinstance(prompt, str):
        return prompt
    for message in reversed(prompt):
        if message["role"] == "user":
            return message["content"]
    return prompt[-1]["content"] if prompt else ""


EXAMPLE_MESSAGE = '{"role": "user", "content": "..."}'


def _check_messages(messages: Any, where: str, key: str) -> list[Message]:
    """The chat messages in field `key` of the record at `where` (file:line), checked and copied."""
    if not isinstance(messages, list) or not messages:
        raise RecordsError(f"{where}: `{key}` must be a non-empty list of {{role, content}} objects, got "
                           f"{messages!r:.40} -- give at least one, e.g. {EXAMPLE_MESSAGE}")
    for message in messages:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RecordsError(f"{where}: every message in `{key}` needs `role` and `content`, got {message!r:.80} "
                               f"-- write each like {EXAMPLE_MESSAGE}")
        if message["role"] not in ("system", "user", "assistant"):
            raise RecordsError(f"{where}: unknown role {message['role']!r} in `{key}` -- use system, user or assistant")
        # str() would turn null into the text "None" and a list of content parts into its Python repr.
        if not isinstance(message["content"], str):
            raise RecordsError(f"{where}: a {message['role']} message's content is "
                               f"{'null' if message['content'] is None else type(message['content']).__name__}, "
                               f"not text -- give each message's content in `{key}` as one string")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def check_prompt(value: Any, where: str) -> str | list[Message]:
    """A record's `prompt` field, checked where it is read (`where` is file:line): non-empty text, or chat
    messages (returned as a checked copy). The critique, preference and scoring readers share it, so a bad
    prompt fails the same way in each, not as a null read as the text "None" or a crash in the chat template."""
    if isinstance(value, list):
        return _check_messages(value, where, "prompt")
    if not isinstance(value, str) or not value.strip():
        raise RecordsError(f"{where}: `prompt` must be non-empty text or chat messages, got {value!r:.40} "
                           "-- give the request as a string, or as a list of {role, content} messages")
    return value


def _prompt_from_row(row: dict[str, Any], where: str) -> str | list[Message]:
    for column in PROMPT_COLUMNS:
        value = row.get(column)
        if isinstance(value, str) and value.strip():
            context = row.get("input")  # Alpaca-style rows: the instruction, then the text it is about
            if column == "instruction" and isinstance(context, str) and context.strip():
                return f"{value.strip()}\n\n{context.strip()}"
            return value.strip()
        if column == "prompt" and isinstance(value, list):
            return _check_messages(value, where, "prompt")
    if "messages" in row:
        return _before_answer(_check_messages(row["messages"], where, "messages"))
    if isinstance(row.get("chosen"), str | list):
        # A preference record (hh-rlhf transcript, trl conversational): the red-team prompts people have
        # (the CAI paper's own) come this way; the prompt is the conversation before the final answer.
        if isinstance(row["chosen"], list):
            return _before_answer(_check_messages(row["chosen"], where, "chosen"))
        try:
            return _before_answer(parse_transcript(row["chosen"]))
        except ValueError as exc:
            raise RecordsError(f"{where}: `chosen` is {exc} -- give hh-rlhf transcripts "
                               "(\"\\n\\nHuman: ...\\n\\nAssistant: ...\"), or a `prompt` column") from None
    present = [column for column in PROMPT_COLUMNS if column in row]
    if present:
        value = row[present[0]]
        if value is not None and not isinstance(value, str):  # `"prompt": 5` is no empty prompt
            raise RecordsError(f"{where}: `{present[0]}` must be text, got {type(value).__name__} {value!r:.40} -- "
                               "give the prompt's text as a string, or chat `messages`")
        raise RecordsError(f"{where}: `{present[0]}` is empty -- give the prompt's text, or remove the line")
    raise RecordsError(f"{where}: no prompt found -- give a column named one of {', '.join(PROMPT_COLUMNS)}, "
                       "chat `messages`, or hh-rlhf `chosen` transcripts")


def _before_answer(messages: list[Message]) -> str | list[Message]:
    """A conversation as a prompt: a final assistant turn is a demonstration and is dropped (the prompt is
    everything before it); a lone user turn becomes its text."""
    if messages[-1]["role"] == "assistant" and len(messages) > 1:
        messages = messages[:-1]
    return messages[0]["content"] if len(messages) == 1 and messages[0]["role"] == "user" else messages


def read_prompts(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Read a prompt set (JSONL, CSV, or plain text) into prompt records `{"id", "prompt", ...}`.

    The prompt comes from the first of `PROMPT_COLUMNS` present, or from chat `messages`; a `.txt` file
    holds one prompt per line. Other fields (`category`, `answer`, `tests`) are kept. Records without an
    `id` get one derived from the prompt; a duplicate id fails naming both lines.
    """
    path = input_source(path)
    records: list[dict[str, Any]] = []
    for _, record in _prompt_records(path):
        records.append(record)
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise RecordsError(f"{path}: no records -- the file is empty")
    return records


def prompt_line(path: str | Path, record_id: str) -> int | None:
    """The line of `path` that the prompt record `record_id` of `read_prompts(path)` came from."""
    return next((number for number, record in _prompt_records(input_source(path)) if record["id"] == record_id),
                None)


def _prompt_records(path: Path | str) -> Iterator[tuple[int, dict[str, Any]]]:
    at = locator(path)
    if is_dataset_source(path):
        rows = dataset_rows(path)
    elif path.suffix.lower() == ".csv":
        rows = _read_csv(path)
    elif path.suffix.lower() == ".txt":
        rows = _read_text(path)
    else:
        rows = read_jsonl(path, line_hint='each line must be one JSON object like {"prompt": "..."} '
                                          "(for one prompt per line of plain text, name the file .txt)")
    first_line: dict[str, int] = {}
    for number, row in rows:
        where = at(number)
        prompt = _prompt_from_row(row, where)
        record = {k: v for k, v in row.items() if k not in (*PROMPT_COLUMNS, "messages", "chosen", "rejected")}
        record["prompt"] = prompt
        given_id = record_id(row.get("id"), where)
        record["id"] = given_id or stable_id("p", json.dumps(prompt, sort_keys=True))
        if record["id"] in first_line and given_id is None:
            raise RecordsError(f"{where}: the same prompt as line {first_line[record['id']]} -- remove one "
                               "(each prompt is asked once; in JSONL or CSV, distinct `id`s keep both)")
        check_unique_id(first_line, record["id"], number, where)
        yield number, record


def check_unique_id(first_line: dict[str, int], value: Any, number: int, where: str) -> None:
    """Note id `value` as seen on line `number` of a file being read; a RecordsError at `where` if an
    earlier line had it (two outputs concatenated would otherwise count each record twice), or if it is no
    id (see `record_id`)."""
    key = record_id(value, where) or str(value)
    if key in first_line:
        raise RecordsError(f"{where}: duplicate id {value!r} (first seen on line {first_line[key]}) -- ids "
                           "must be unique; keep one of the two")
    first_line[key] = number


def record_id(value: Any, where: str) -> str | None:
    """A record's `id` as text: a string as given, a whole number as its digits (datasets number their rows);
    None for JSON null or a blank CSV cell (an id is derived instead). Anything else (a list, an object,
    true, 1.5) is refused rather than turned into its Python repr."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise RecordsError(f"{where}: `id` must be text or a whole number, got {json.dumps(value)[:40]} -- write it "
                       'as a string, e.g. "id": "p-1"')


def _read_text(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """One prompt per non-blank line. Lines end at "\n" (or "\r\n") only: `str.splitlines` would also
    split a prompt at the Unicode separators some text holds (U+2028, form feeds)."""
    text = paths.read_input_text(path, RecordsError, "prompt file (JSONL, CSV or .txt)")
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            yield number, {"prompt": line.removesuffix("\r")}


def _read_csv(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    # The byte order mark that spreadsheet programs start "CSV UTF-8" files with is dropped; it would
    # otherwise stick to the first column's name.
    text = paths.read_input_text(path, RecordsError, "CSV file with a header line")
    with io.StringIO(text, newline="") as handle:
        # strict: a quote left open (a file cut short, a stray quote) is an error; otherwise the csv
        # module reads every line after it into one field, several prompts silently becoming one.
        reader = csv.DictReader(handle, strict=True)
        start = 2  # the line the next row starts on (line 1 is the header)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise RecordsError(f"{path}:{start}: not valid CSV ({exc}) -- a field with commas, quotes or line "
                                   'breaks must be quoted whole, with its own quotes doubled ("say ""hi"""), and '
                                   "every quote closed") from exc
            if None in row:  # more fields than the header: an unquoted comma split a field
                raise RecordsError(f"{path}:{start}: {len(reader.fieldnames) + len(row[None])} fields where the "
                                   f"header has {len(reader.fieldnames)} -- quote a field that contains commas "
                                   '("How do I do X, Y?")')
            # line_num is the physical line where the row ended (handles quoted newlines).
            yield reader.line_num, row
            start = reader.line_num + 1


# ----------------------------------------------------------------------------- hh-rlhf transcripts

_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_transcript(text: str) -> list[Message]:
    """Split an hh-rlhf transcript (`"\\n\\nHuman: ...\\n\\nAssistant: ..."`) into messages.

    Consecutive turns by one speaker (a transcript with no "Assistant:" between two "Human:" turns) are
    joined into one turn, the texts a blank line apart: the words are all the person's, and chat templates
    that require user and assistant to alternate (Llama 2's, Mistral's) raise on two user turns in a row."""
    text = text.replace("\r\n", "\n")  # a file that went through a Windows tool
    if not text.startswith("\n\n"):
        text = "\n\n" + text.lstrip("\n")
    parts = _TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError("not an hh-rlhf transcript: expected it to start with 'Human: '")
    messages: list[Message] = []
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        role = "user" if speaker == "Human" else "assistant"
        if messages and messages[-1]["role"] == role:  # two turns in a row by one speaker: one turn
            messages[-1]["content"] += "\n\n" + content.strip()
        else:
            messages.append({"role": role, "content": content.strip()})
    return messages


def split_transcript_pair(chosen: str, rejected: str) -> tuple[list[Message], str, str]:
    """Split two hh-rlhf transcripts that share a conversation into (conversation, chosen, rejected).

    The conversation is every turn before the final assistant answer; it must be the same in both.
    """
    chosen_messages, rejected_messages = parse_transcript(chosen), parse_transcript(rejected)
    for messages in (chosen_messages, rejected_messages):
        if messages[-1]["role"] != "assistant":
            raise ValueError("the transcript does not end with an Assistant turn")
    if chosen_messages[:-1] != rejected_messages[:-1]:
        raise ValueError("chosen and rejected do not share the conversation before the last answer")
    return chosen_messages[:-1], chosen_messages[-1]["content"], rejected_messages[-1]["content"]


# ----------------------------------------------------------------------------- third-party eval sets

# The red-team and over-refusal sets people measure on, read as they are published. Each row counts on
# one side of the harmless-helpful picture: a harmful request (refusing it is harmless) or a benign one
# (refusing it is over-refusal). A `label` column (XSTest's safe/unsafe) decides per row; the red-team
# sets (HarmBench, StrongREJECT, AdvBench) are harmful throughout.
EVAL_SIDES = ("harmful", "benign")
_LABEL_SIDES = {"safe": "benign", "benign": "benign", "unsafe": "harmful", "harmful": "harmful"}


def eval_set_format(columns: list[str]) -> str:
    """Which published format a table's columns are: harmbench, xstest, strongreject, advbench or prompts."""
    if "Behavior" in columns:
        return "harmbench"
    if "forbidden_prompt" in columns:
        return "strongreject"
    if "goal" in columns:
        return "advbench"
    if "label" in columns:
        return "xstest"
    return "prompts"


def split_eval_spec(spec: str) -> tuple[str | None, str]:
    """`harmful:PATH` / `benign:PATH` -> (side, PATH); a bare PATH -> (None, PATH)."""
    for side in EVAL_SIDES:
        if spec.startswith(f"{side}:"):
            return side, spec[len(side) + 1:]
    return None, spec


def read_eval_set(spec: str, limit: int | None = None,
                  harmbench_categories: tuple[str, ...] = ("standard",)) -> list[dict[str, Any]]:
    """Prompt records `{"id", "prompt", "category", "side"}` from a red-team or over-refusal set in its
    published format (`spec` is PATH, or `harmful:PATH` / `benign:PATH`):

    - HarmBench CSV: `Behavior`, rows whose `FunctionalCategory` is in `harmbench_categories` (empty: all),
      `SemanticCategory` as the category, a `ContextString` put before the behaviour as HarmBench does;
    - XSTest CSV: `prompt`, `label` safe/unsafe (the side), `type` (the category);
    - StrongREJECT CSV: `forbidden_prompt`, `category`; AdvBench CSV: `goal`;
    - any prompt file `read_prompts` reads, with a `label` column or a side prefix.

    A side prefix keeps that side's rows of a labelled set (`benign:xstest.csv`, its safe prompts) and
    names the side of an unlabelled one. `limit` applies after filtering."""
    wanted, raw_path = split_eval_spec(spec)
    path = input_source(raw_path)
    at = locator(path)
    suffix = Path(path).suffix.lower()
    rows = list(dataset_rows(path) if is_dataset_source(path) else _read_csv(path) if suffix == ".csv"
                else _read_text(path) if suffix == ".txt" else read_jsonl(path))
    kind = eval_set_format(list(rows[0][1]) if rows else [])
    kept: list[dict[str, Any]] = []
    first_line: dict[str, int] = {}
    for number, row in rows:
        where = at(number)
        record = {"prompt": _prompt_from_row(row, where), "category": row.get("category")}
        given_id = record_id(row.get("BehaviorID") if kind == "harmbench" else row.get("id"), where)
        record["id"] = given_id or stable_id("p", json.dumps(record["prompt"]))
        if kind == "harmbench":
            functional = str(row.get("FunctionalCategory") or "").strip()
            if harmbench_categories and functional and functional not in harmbench_categories:
                continue
            context = str(row.get("ContextString") or "").strip()
            if context and isinstance(record["prompt"], str):
                record["prompt"] = f"{context}\n\n---\n\n{record['prompt']}"
            record["category"] = row.get("SemanticCategory") or record["category"]
        if kind == "xstest":
            record["category"] = row.get("type") or record["category"]
        label = row.get("label")
        if label is not None and str(label).strip():
            side = _LABEL_SIDES.get(str(label).strip().lower())
            if side is None:
                raise RecordsError(f"{where}: label {label!r} -- use safe or unsafe (XSTest's labels)")
        elif kind in ("harmbench", "strongreject", "advbench"):
            side = "harmful"
        elif wanted is None:
            raise RecordsError(f"{path}: no `label` column says which prompts are harmful -- name the side: "
                               f"harmful:{raw_path} or benign:{raw_path}")
        else:
            side = wanted
        if wanted is not None and side != wanted:
            if label is None and kind != "prompts":
                raise RecordsError(f"{path}: a {kind} set holds harmful requests -- drop the '{wanted}:' prefix")
            continue
        check_unique_id(first_line, record["id"], number, where)
        kept.append({**record, "side": side})
        if limit is not None and len(kept) >= limit:
            break
    if not kept:
        raise RecordsError(f"{path}: no {wanted + ' ' if wanted else ''}prompts left after filtering"
                           + (f" (FunctionalCategory in {', '.join(harmbench_categories)})" if kind == "harmbench"
                              else "") + " -- check the file and the side prefix")
    return kept


# ----------------------------------------------------------------------------- preferences


def _final_answer(value: Any, where: str, key: str) -> tuple[list[Message] | None, str]:
    """A chosen/rejected value in any accepted shape -> (conversation prefix or None, answer text)."""
    if isinstance(value, str):
        return None, value
    if isinstance(value, list):
        messages = _check_messages(value, where, key)
        if messages[-1]["role"] != "assistant":
            raise RecordsError(f"{where}: `{key}` must end with an assistant message")
        return messages[:-1] or None, messages[-1]["content"]
    raise RecordsError(f"{where}: `{key}` must be a string or a list of messages")


def normalize_preference(row: dict[str, Any], where: str, default_source: str) -> dict[str, Any]:
    """One preference row in any accepted format -> `{"id", "prompt", "chosen", "rejected", "p_chosen", "source"}`.

    Accepted: this project's records; hh-rlhf transcripts (`chosen`/`rejected` only); trl's
    conversational format (`prompt` messages + `chosen`/`rejected` assistant messages) and its
    implicit-prompt variant (full conversations in `chosen`/`rejected`).
    """
    if "chosen" not in row or "rejected" not in row:
        raise RecordsError(f"{where}: a preference needs `chosen` and `rejected` -- see README, 'Data formats'")
    extra = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
    if "prompt" in row:
        prompt = check_prompt(row["prompt"], where)
        _, chosen = _final_answer(row["chosen"], where, "chosen")
        _, rejected = _final_answer(row["rejected"], where, "rejected")
    elif isinstance(row["chosen"], str) and "\n\nAssistant:" in "\n\n" + row["chosen"].replace("\r\n", "\n").lstrip("\n"):
        try:
            messages, chosen, rejected = split_transcript_pair(row["chosen"], row["rejected"])
        except ValueError as exc:
            raise MalformedRow(f"{where}: {exc} -- hh-rlhf rows must differ only in the last Assistant turn",
                               str(exc)) from None
        prompt = messages[0]["content"] if len(messages) == 1 else messages
    else:
        chosen_prefix, chosen = _final_answer(row["chosen"], where, "chosen")
        rejected_prefix, rejected = _final_answer(row["rejected"], where, "rejected")
        if chosen_prefix is None or chosen_prefix != rejected_prefix:
            raise RecordsError(f"{where}: no `prompt`, and chosen/rejected do not share a conversation "
                               "-- add a `prompt` field")
        prompt = chosen_prefix[0]["content"] if len(chosen_prefix) == 1 and chosen_prefix[0]["role"] == "user" \
            else chosen_prefix
    p_chosen = extra.pop("p_chosen", 1.0)
    if isinstance(p_chosen, bool) or not isinstance(p_chosen, int | float):
        raise RecordsError(f"{where}: p_chosen={p_chosen!r} is not a number -- use a probability in [0, 1]")
    p_chosen = float(p_chosen)
    if not 0.0 <= p_chosen <= 1.0:
        raise RecordsError(f"{where}: p_chosen={p_chosen} is not a probability -- use a value in [0, 1]")
    given_id = record_id(extra.pop("id", None), where)
    record = {
        "id": given_id or stable_id("pref", json.dumps([prompt, chosen, rejected])),
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "p_chosen": p_chosen,
        "source": extra.pop("source", default_source),
    }
    record.update(extra)
    return record


def read_preferences(path: str | Path, default_source: str = "human-helpful", limit: int | None = None,
                     dropped: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Read preference pairs in any accepted format (see `normalize_preference`) from a JSONL file
    (`.jsonl.gz` too: hh-rlhf ships that way) or any source `dataset_rows` reads.

    Rows without a `source` get `default_source`; rows without `p_chosen` are hard labels (1.0). Published
    data has a few malformed rows (hh-rlhf's harmless-base test split: 5 of 2,312 whose chosen and rejected
    differ before the last answer): they are skipped with a logged count and reason, and appended to
    `dropped` (each with `where` and `reason`) for the caller to keep; when they are most of the rows the
    file is in another format, and the first one's error is raised.
    """
    source = input_source(path)
    at = locator(source)
    rows = dataset_rows(source) if is_dataset_source(source) else read_jsonl(
        source, line_hint='each line must be one JSON object like {"prompt": "...", "chosen": "...", "rejected": "..."}')
    records: list[dict[str, Any]] = []
    skipped: list[MalformedRow] = []
    for number, row in rows:
        try:
            records.append(normalize_preference(row, at(number), default_source))
        except MalformedRow as exc:
            skipped.append(exc)
            if dropped is not None:
                dropped.append({**row, "where": at(number), "reason": exc.reason})
            continue
        if limit is not None and len(records) >= limit:
            break
    if len(skipped) > len(records):
        raise skipped[0]
    if not records:
        raise RecordsError(f"{source}: no preference records -- the file is empty")
    if skipped:
        log.warning(f"{source}: skipped {len(skipped)} of {len(skipped) + len(records)} rows: "
                    f"{skipped[0].reason} (first at {str(skipped[0]).split(': ', 1)[0]})")
    return records


# A side short of the fraction is repeated to fill it, at most this many times over; past that, the other
# side is sampled down instead. Without a cap, 500 AI labels mixed with hh-rlhf's 43,835 helpful-base
# comparisons at 42.5% made 103,141 comparisons, each AI pair seen 119 times an epoch (memorised, and
# hours on a CPU); with it, 2,000 (each AI pair 4 times) + 1,478 human ones. A bound chosen, not measured:
# the demo repeats its AI pairs twice.
MAX_REPEATS = 4


@dataclass
class PreferenceMix:
    """The training mix of `mix_preferences` and exactly what went into it."""

    records: list[dict[str, Any]]
    ai_used: int
    human_used: int
    ai_available: int
    human_available: int
    resampled: str | None = None  # which side was repeated to reach the fraction

    def summary(self) -> str:
        total = self.ai_used + self.human_used
        text = (f"{total} comparisons: {self.ai_used} AI-harmless (of {self.ai_available}) + "
                f"{self.human_used} human-helpful (of {self.human_available})")
        if self.human_available == 0:
            text += "; no human comparisons to train on (none given, or all held out), training on AI labels alone"
        if self.resampled:
            text += f"; {self.resampled} records repeated to reach the requested fraction"
            used, available = ((self.human_used, self.human_available) if self.resampled == "AI"
                               else (self.ai_used, self.ai_available))
            if used < available:
                text += f" ({MAX_REPEATS} times each at most, so the other side was sampled down)"
        return text


def mix_preferences(ai: list[dict[str, Any]], human: list[dict[str, Any]], human_fraction: float,
                    seed: int = 0) -> PreferenceMix:
    """Mix AI-harmless and human-helpful comparisons so humans are `human_fraction` of the result.

    The mix is as large as the side with more records for the fraction allows, every one of its
    records used once, while the other side is repeated (each record as often as the others, give or
    take one) at most MAX_REPEATS times over; where that would take more, the larger side is sampled
    down to fit. Sampling is seeded, the fraction holds within one record and the summary says what was
    repeated. Without human records the mix is the AI records alone.
    """
    if not 0.0 <= human_fraction <= 1.0:
        raise ValueError(f"human_fraction={human_fraction} must be in [0, 1]")
    rng = random.Random(seed)
    if not human or human_fraction == 0.0:
        mixed = list(ai)
        rng.shuffle(mixed)
        return PreferenceMix(mixed, len(ai), 0, len(ai), len(human))
    if not ai or human_fraction == 1.0:
        mixed = list(human)
        rng.shuffle(mixed)
        return PreferenceMix(mixed, 0, len(human), len(ai), len(human))
    # The mix size each side could fill alone, each record once: the larger sets the mix, within the cap.
    human_scale, ai_scale = len(human) / human_fraction, len(ai) / (1.0 - human_fraction)
    total = min(max(human_scale, ai_scale), MAX_REPEATS * min(human_scale, ai_scale))
    ai_part = _take(ai, round(total * (1.0 - human_fraction)), rng)
    human_part = _take(human, round(total * human_fraction), rng)
    resampled = "AI" if len(ai_part) > len(ai) else "human" if len(human_part) > len(human) else None
    mixed = ai_part + human_part
    rng.shuffle(mixed)
    return PreferenceMix(mixed, len(ai_part), len(human_part), len(ai), len(human), resampled)


def _take(records: list[dict[str, Any]], count: int, rng: random.Random) -> list[dict[str, Any]]:
    """`count` of `records`: a seeded sample when there are enough; else every record count // len times
    and a seeded sample of them for the rest, so no record is used twice more than another."""
    copies, rest = divmod(count, len(records))
    return list(records) * copies + rng.sample(records, rest)


# ----------------------------------------------------------------------------- writing


@dataclass
class RecordWriter:
    """Append-only JSONL writer that resumes.

    Opening an existing file reads the ids already in it (`done_ids`); a torn last line (a kill in the
    middle of a write) is cut off and counted in `torn_lines`. `append` writes one record, flushes and
    fsyncs it, so a crash loses at most the record being written; an id already present is skipped
    (and counted in `duplicates_skipped`), so a resumed run never writes an id twice.

        with RecordWriter(path) as out:
            for item in items:
                if item.id not in out.done_ids:
                    out.append(make_record(item))
    """

    path: Path
    done_ids: set[str] = field(default_factory=set)
    torn_lines: int = 0
    duplicates_skipped: int = 0
    written: int = 0

    def __post_init__(self):
        self.path = Path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._recover()
        self._handle = self.path.open("a", encoding="utf-8")

    def _recover(self) -> None:
        raw = self.path.read_bytes()
        good_end = 0
        position = 0
        for number, line in enumerate(raw.split(b"\n"), start=1):
            end = position + len(line)
            terminated = end < len(raw)  # a "\n" follows this line
            if line.strip():
                try:
                    obj = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                    if terminated:
                        raise RecordsError(f"{self.path}:{number}: not valid JSON -- this file was not written "
                                           "by cai, or was edited; fix or remove that line") from None
                    self.torn_lines += 1
                    break
                if not terminated:
                    # Valid JSON but the newline never made it: keep it, finish the line.
                    with self.path.open("ab") as handle:
                        handle.write(b"\n")
                    terminated = True
                    end = len(raw)
                if "id" not in obj:
                    raise RecordsError(f"{self.path}:{number}: record has no `id` -- cannot resume safely")
                self.done_ids.add(str(obj["id"]))
            good_end = end + 1 if terminated else end
            position = end + 1
        if self.torn_lines:
            with self.path.open("r+b") as handle:
                handle.truncate(good_end)

    def append(self, record: dict[str, Any]) -> bool:
        """Write one record now (flushed and fsynced). Returns False if its id was already written."""
        record_id = str(record["id"])
        if record_id in self.done_ids:
            self.duplicates_skipped += 1
            return False
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.done_ids.add(record_id)
        self.written += 1
        return True

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Write a whole JSONL file atomically (temp file + rename): for small derived outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


class Resume:
    """Resume by id for a stage that makes one JSONL record per item: the file at `path` is read once,
    the items whose id (`key(item)`) it holds, or `skip` holds, are `done`, and the rest come in chunks of
    `chunk_size`; `write` appends a chunk's records, each on disk as it is written, so a killed run keeps
    what it finished and its rerun makes only what is missing.

        with Resume(out, prompts, chunk_size=8) as resume:
            for chunk in resume:
                resume.write(make_records(chunk))
        records = resume.records()   # one per item that has one, in the items' order
    """

    def __init__(self, path: str | Path, items: list, chunk_size: int, key=lambda item: item["id"],
                 skip: set[str] = frozenset()):
        self.writer = RecordWriter(path)  # opened first: it mends a line torn by a kill
        self.key, self.chunk_size, self.skip = key, chunk_size, skip
        self.by_id = {str(r["id"]): r for _, r in read_jsonl(self.writer.path)} if self.writer.done_ids else {}
        self.items: list = []
        self.todo: list = []  # items without a record, not yet handed out
        self.done = 0
        self.add(items)

    def add(self, items: list) -> None:
        """Take more items, whose records go to the same file."""
        todo = [item for item in items if str(self.key(item)) not in self.by_id and str(self.key(item)) not in self.skip]
        self.items, self.todo, self.done = self.items + items, self.todo + todo, self.done + len(items) - len(todo)

    def __iter__(self) -> Iterator[list]:
        while self.todo:
            chunk, self.todo = self.todo[:self.chunk_size], self.todo[self.chunk_size:]
            yield chunk

    def write(self, records) -> None:
        for record in records:
            if self.writer.append(record):
                self.by_id[str(record["id"])] = record

    def records(self) -> list[dict[str, Any]]:
        return [self.by_id[key] for item in self.items if (key := str(self.key(item))) in self.by_id]

    def __enter__(self) -> "Resume":
        return self

    def __exit__(self, *exc) -> None:
        self.writer.close()


# ----------------------------------------------------------------------------- `datasets` sources

# Besides cai's own JSONL/CSV/text files, every input takes what the `datasets` library reads: a parquet or
# arrow file, a folder written by `save_to_disk`, a glob of data files, and a hub dataset from the local
# Hugging Face cache, written `hf:OWNER/NAME[/DATA_DIR][@SPLIT]` (split `train` unless given), e.g.
# `hf:Anthropic/hh-rlhf/harmless-base@test`. Rows from these go through the same record adapters as lines
# of a file; an error names the source and the row's index.
HUB_PREFIX = "hf:"
TABLE_SUFFIXES = (".parquet", ".arrow")
_GLOB_CHARS = "*?["
# The `datasets` builder for each kind of file a glob can match.
_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".gz": "json",
             ".csv": "csv", ".txt": "text"}


def is_dataset_source(value: str | Path) -> bool:
    """Whether `value` is read through `datasets` (see above) rather than by cai's own readers."""
    text = str(value)
    path = Path(text).expanduser()
    if text.startswith(HUB_PREFIX) or (any(char in text for char in _GLOB_CHARS) and not path.exists()):
        return True
    return path.suffix.lower() in TABLE_SUFFIXES or path.is_dir()


def input_source(value: str | Path) -> Path | str:
    """An input as its reader takes it: a hub id or glob as written, else a path (`data/...` names a bundled
    file outside a checkout too)."""
    text = str(value)
    if text.startswith(HUB_PREFIX) or (any(char in text for char in _GLOB_CHARS) and not Path(text).exists()):
        return text
    path = local_or_bundled(value)
    if not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not Path(text).suffix:  # a hub id
        raise RecordsError(f"{text}: no such file -- for the hub dataset, write hf:{text}[/DATA_DIR][@SPLIT] "
                           f"(e.g. hf:{text}@test)")
    return path


def locator(source: str | Path):
    """`where(number)` for a row of `source`: `file:line` for cai's files, `SOURCE row N` for the rest."""
    if is_dataset_source(source):
        return lambda number: f"{source} row {number}"
    return lambda number: f"{source}:{number}"


def dataset_rows(source: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """`(index, row)` for each row of a source `datasets` reads (see `is_dataset_source`)."""
    yield from enumerate(_load_table(str(source)))


def _load_table(text: str):
    import datasets

    datasets.disable_progress_bars()  # cai's own progress shows; "Generating train split" bars would not
    try:
        if text.startswith(HUB_PREFIX):
            return _hub_table(text)
        if any(char in text for char in _GLOB_CHARS) and not Path(text).exists():
            files = sorted(glob.glob(os.path.expanduser(text), recursive=True))
            if not files:
                raise RecordsError(f"{text}: no file matches the pattern -- check the path and the pattern")
            suffixes = {Path(file).suffix.lower() for file in files}
            builder = _BUILDERS.get(next(iter(suffixes))) if len(suffixes) == 1 else None
            if builder is None:
                raise RecordsError(f"{text}: matches {', '.join(sorted(suffixes))} files -- match files of one "
                                   f"kind: {', '.join(sorted(_BUILDERS))}")
            return datasets.load_dataset(builder, data_files=files, split="train")
        path = Path(text).expanduser()
        if not path.exists():
            raise RecordsError(f"{path}: no such file -- check the path")
        if path.is_dir():
            return _saved_table(path)
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet

            return pyarrow.parquet.read_table(path).to_pylist()
        return datasets.Dataset.from_file(str(path))
    except RecordsError:
        raise
    except Exception as exc:  # noqa: BLE001 -- any reader failure is this input's problem, said in one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RecordsError(f"{text}: `datasets` cannot read it ({reason[:200]}) -- give a parquet or arrow file, "
                           "a folder written by save_to_disk, or hf:OWNER/NAME[/DATA_DIR][@SPLIT]") from None


def _saved_table(path: Path):
    import datasets

    if (path / "dataset_dict.json").exists():
        splits = sorted(child.name for child in path.iterdir() if (child / "dataset_info.json").exists())
        raise RecordsError(f"{path}: holds the splits {', '.join(splits)} -- give one of them, e.g. "
                           f"{path / (splits[0] if splits else 'train')}")
    if not (path / "dataset_info.json").exists():
        raise RecordsError(f"{path}: is a directory that save_to_disk did not write -- give a file in it, or "
                           "a folder written by Dataset.save_to_disk")
    return datasets.load_from_disk(str(path))


def _hub_table(text: str):
    """A split of a hub dataset from the local Hugging Face cache (`HF_HUB_CACHE`); cai never downloads."""
    import datasets
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    spec, _, split = text[len(HUB_PREFIX):].partition("@")
    parts = spec.strip("/").split("/")
    if len(parts) < 2 or not all(parts) or not split and "@" in text:
        raise RecordsError(f"{text}: expected hf:OWNER/NAME[/DATA_DIR][@SPLIT] -- e.g. "
                           "hf:Anthropic/hh-rlhf/harmless-base@test")
    repo, data_dir = "/".join(parts[:2]), "/".join(parts[2:]) or None
    try:
        folder = Path(snapshot_download(repo, repo_type="dataset", local_files_only=True))
    except LocalEntryNotFoundError:
        only = f" --include '{data_dir}/*'" if data_dir else ""
        raise RecordsError(f"{text}: {repo} is not in the local Hugging Face cache -- fetch it with "
                           f"`hf download {repo} --repo-type dataset{only}`") from None
    if data_dir and not (folder / data_dir).is_dir():
        folders = sorted(child.name for child in folder.iterdir() if child.is_dir() and not child.name.startswith("."))
        raise RecordsError(f"{text}: the cached {repo} has no folder {data_dir!r} -- use one of: "
                           f"{', '.join(folders) or 'none'} (or fetch it: `hf download {repo} --repo-type dataset`)")
    return datasets.load_dataset(str(folder), data_dir=data_dir, split=split or "train")


def read_rows(value: str | Path, **jsonl_options: Any) -> tuple[Path | str, Iterator[tuple[int, dict[str, Any]]]]:
    """`(source, rows)` for an input of JSON-like rows: a JSONL file (`read_jsonl`, line numbers) or a
    source `dataset_rows` reads (row indexes)."""
    source = input_source(value)
    return source, dataset_rows(source) if is_dataset_source(source) else read_jsonl(source, **jsonl_options)
