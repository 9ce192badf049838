"""Inputs that the `datasets` library reads (parquet, arrow, save_to_disk folders, globs, a hub dataset from
the local cache), and real preference data with a few malformed rows. Nothing downloads: the hub cache is
built in a temporary directory."""

import gzip
import json
import logging

import datasets
import huggingface_hub.constants
import pyarrow
import pyarrow.parquet
import pytest

from cai.errors import RecordsError
from cai.recipe import _existing_path
from cai.records import read_eval_set, read_preferences, read_prompts, read_rows


def transcript(question: str, answer: str) -> str:
    return f"\n\nHuman: {question}\n\nAssistant: {answer}"


PAIRS = [{"chosen": transcript(f"Question {i}?", f"Kind answer {i}."),
          "rejected": transcript(f"Question {i}?", f"Curt answer {i}.")} for i in range(4)]


def write_parquet(path, rows):
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face hub cache holding the dataset `team/prefs` (one revision), with a `harmless` folder
    of hh-rlhf-style `.jsonl.gz` splits, laid out as `hf download` leaves it."""
    hub = tmp_path / "hub"
    repo = hub / "datasets--team--prefs"
    snapshot = repo / "snapshots" / "0123abcd"
    (snapshot / "harmless").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    for split, rows in (("train", PAIRS), ("test", PAIRS[:2])):
        with gzip.open(snapshot / "harmless" / f"{split}.jsonl.gz", "wt") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    return hub


def test_a_parquet_file_of_prompts(tmp_path):
    path = write_parquet(tmp_path / "prompts.parquet", [{"prompt": "Name a colour.", "category": "easy"},
                                                       {"prompt": "Name a bird.", "category": "easy"}])
    records = read_prompts(path)
    assert [r["prompt"] for r in records] == ["Name a colour.", "Name a bird."]
    assert records[0]["category"] == "easy"


def test_a_bad_row_names_the_source_and_the_row_index(tmp_path):
    path = write_parquet(tmp_path / "prompts.parquet", [{"prompt": "Name a colour."}, {"prompt": ""}])
    with pytest.raises(RecordsError, match=r"prompts\.parquet row 1: `prompt` is empty"):
        read_prompts(path)


def test_a_saved_folder_and_its_arrow_file(tmp_path):
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(PAIRS).save_to_disk(str(folder))
    from_folder = read_preferences(folder)
    assert [r["chosen"] for r in from_folder] == [f"Kind answer {i}." for i in range(4)]
    assert from_folder[0]["prompt"] == "Question 0?"
    arrow_file = next(folder.glob("*.arrow"))
    assert read_preferences(arrow_file) == from_folder


def test_a_saved_dataset_dict_asks_for_a_split(tmp_path):
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS),
                          "test": datasets.Dataset.from_list(PAIRS[:1])}).save_to_disk(str(folder))
    with pytest.raises(RecordsError, match="holds the splits test, train -- give one of them"):
        read_preferences(folder)
    assert len(read_preferences(folder / "test")) == 1


def test_a_plain_folder_is_refused_with_the_fix(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(RecordsError, match="is a directory that save_to_disk did not write"):
        read_prompts(tmp_path / "plain")


def test_a_glob_reads_every_matching_file(tmp_path):
    (tmp_path / "shards").mkdir()
    write_parquet(tmp_path / "shards" / "a.parquet", [{"prompt": "One?"}])
    write_parquet(tmp_path / "shards" / "b.parquet", [{"prompt": "Two?"}, {"prompt": "Three?"}])
    assert [r["prompt"] for r in read_prompts(str(tmp_path / "shards" / "*.parquet"))] == ["One?", "Two?", "Three?"]
    with pytest.raises(RecordsError, match="no file matches the pattern"):
        read_prompts(str(tmp_path / "shards" / "*.csv"))
    named = tmp_path / "prompts[v2].jsonl"  # a file whose name looks like a pattern is that file
    named.write_text('{"prompt": "Four?"}\n')
    assert [r["prompt"] for r in read_prompts(named)] == ["Four?"]


def test_a_hub_dataset_from_the_local_cache(hub_cache):
    test = read_preferences("hf:team/prefs/harmless@test")
    assert [r["prompt"] for r in test] == ["Question 0?", "Question 1?"]
    assert len(read_preferences("hf:team/prefs/harmless")) == 4  # the train split unless one is named
    assert [r["prompt"] for r in read_prompts("hf:team/prefs/harmless@test")] == ["Question 0?", "Question 1?"]


def test_a_hub_dataset_missing_from_the_cache_says_how_to_fetch_it(hub_cache):
    with pytest.raises(RecordsError, match=r"hf:team/other@test: team/other is not in the local Hugging Face "
                                           r"cache -- fetch it with `hf download team/other --repo-type dataset`"):
        read_preferences("hf:team/other@test")
    with pytest.raises(RecordsError, match="has no folder 'helpful' -- use one of: harmless"):
        read_preferences("hf:team/prefs/helpful@test")
    with pytest.raises(RecordsError, match="expected hf:OWNER/NAME"):
        read_preferences("hf:prefs")
    with pytest.raises(RecordsError, match=r"team/prefs: no such file -- for the hub dataset, write hf:team/prefs"):
        read_prompts("team/prefs")


def test_a_recipe_takes_hub_ids_and_globs_and_refuses_unmatched_globs(tmp_path, hub_cache):
    write_parquet(tmp_path / "a.parquet", [{"prompt": "One?"}])
    assert str(_existing_path("hf:team/prefs/harmless@test")) == "hf:team/prefs/harmless@test"
    assert _existing_path(str(tmp_path / "*.parquet")) is not None
    assert _existing_path(str(tmp_path / "*.csv")) is None


def test_critique_records_for_sft_come_from_parquet_too(tmp_path):
    rows = [{"id": "c-1", "prompt": "Hi?", "final": "Hello."}]
    source, read = read_rows(write_parquet(tmp_path / "critique.parquet", rows))
    assert list(read) == [(0, rows[0])]


def test_an_eval_set_from_parquet(tmp_path):
    path = write_parquet(tmp_path / "xstest.parquet", [{"prompt": "How do I kill a process?", "label": "safe",
                                                        "type": "homonyms"}])
    assert read_eval_set(str(path))[0]["side"] == "benign"


# ----------------------------------------------------------------------------- malformed rows of real data

# hh-rlhf's pattern: the rejected transcript loses the blank line before a "Human:" turn, so the two no
# longer share the conversation before the last answer.
QUIRK = {"chosen": transcript("Tell me a fact.", "Water boils at 100 C.") + transcript("Another?", "Ice floats."),
         "rejected": transcript("Tell me a fact.", "Water boils at 100 C.\nHuman: Another?") + "\n\nAssistant: No."}


def test_a_few_malformed_pairs_are_skipped_with_a_count_and_the_reason(tmp_path, caplog):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in [PAIRS[0], QUIRK, PAIRS[1], PAIRS[2]]))
    dropped = []
    with caplog.at_level(logging.WARNING, logger="cai"):
        records = read_preferences(path, dropped=dropped)
    assert [r["prompt"] for r in records] == ["Question 0?", "Question 1?", "Question 2?"]
    assert dropped == [{**QUIRK, "where": f"{path}:2",
                        "reason": "chosen and rejected do not share the conversation before the last answer"}]
    assert "skipped 1 of 4 rows: chosen and rejected do not share" in caplog.text and f"{path}:2" in caplog.text


def test_mostly_malformed_pairs_are_refused(tmp_path):
    path = write_parquet(tmp_path / "pairs.parquet", [QUIRK, QUIRK, PAIRS[0]])
    with pytest.raises(RecordsError, match=r"pairs\.parquet row 0: chosen and rejected do not share"):
        read_preferences(path)
