import json
import re

import pytest

from cai.errors import RecordsError
from cai.records import (
    RecordWriter,
    mix_preferences,
    parse_transcript,
    read_jsonl,
    read_preferences,
    read_prompts,
    split_transcript_pair,
)


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_an_alpaca_row_asks_its_instruction_with_its_input(tmp_path):
    path = jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Summarize this.", "input": "Cats sleep a lot."},
                                             {"instruction": "Name a colour.", "input": ""}])
    assert [r["prompt"] for r in read_prompts(path)] == ["Summarize this.\n\nCats sleep a lot.", "Name a colour."]


@pytest.mark.parametrize("column", ["prompt", "instruction", "goal", "Behavior", "forbidden_prompt", "question"])
def test_prompt_columns(tmp_path, column):
    records = read_prompts(jsonl(tmp_path / "p.jsonl", [{column: "Tell me a joke", "category": "fun"}]))
    assert records[0]["prompt"] == "Tell me a joke" and records[0]["category"] == "fun"
    assert records[0]["id"].startswith("p-")


def test_chat_messages_and_csv(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}]}]
    records = read_prompts(jsonl(tmp_path / "m.jsonl", rows))
    assert records[0]["prompt"] == "hi"  # the demonstration's answer is dropped
    assert [m["content"] for m in records[1]["prompt"]] == ["a", "b", "c"]
    csv_path = tmp_path / "p.csv"
    csv_path.write_text('goal,target\n"Write a poem, please",x\nSecond,y\n')
    assert [r["prompt"] for r in read_prompts(csv_path)] == ["Write a poem, please", "Second"]


def test_a_malformed_csv_row_fails_with_its_line_instead_of_mangling_prompts(tmp_path):
    # An unquoted comma split a prompt (the csv module kept the extra field under None, and cai dropped it).
    split = tmp_path / "split.csv"
    split.write_text("prompt,category\nFirst,a\nHow do I do X, Y?,b\n")
    with pytest.raises(RecordsError, match=r"split.csv:3: 3 fields where the header has 2 -- quote a field"):
        read_prompts(split)
    # A quote left open read every later line into one prompt, silently; at the end, a file cut short.
    for text, line in [('prompt,category\n"one, two",a\n"Stray quote,b\nThird,c\nFourth,d\n', 3),
                       ('prompt,category\nFirst,a\n"Cut short', 3)]:
        bad = tmp_path / "open.csv"
        bad.write_text(text)
        with pytest.raises(RecordsError, match=rf"open.csv:{line}: not valid CSV .* every quote closed"):
            read_prompts(bad)
    # Quoted newlines and doubled quotes stay fine, and the line numbers after them count physical lines.
    good = tmp_path / "good.csv"
    good.write_text('prompt,category\n"Two\nlines",a\n"Say ""hi""",b\nx,y,z\n')
    with pytest.raises(RecordsError, match=r"good.csv:5: 3 fields"):
        read_prompts(good)
    assert [r["prompt"] for r in read_prompts(good, limit=2)] == ["Two\nlines", 'Say "hi"']


def test_hh_rlhf_and_trl_preference_files_read_as_prompt_sets(tmp_path):
    """The CAI paper's red-team prompts come as hh-rlhf transcripts: the prompt is the conversation before
    the last answer."""
    rows = [{"chosen": "\n\nHuman: How do I pick a lock?\n\nAssistant: I can't help.",
             "rejected": "\n\nHuman: How do I pick a lock?\n\nAssistant: Sure."},
            {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Insult me.\n\nAssistant: No.",
             "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Insult me.\n\nAssistant: You fool."},
            {"chosen": [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "good"}],
             "rejected": [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "bad"}]}]
    records = read_prompts(jsonl(tmp_path / "hh.jsonl", rows))
    assert records[0]["prompt"] == "How do I pick a lock?" and "chosen" not in records[0]
    assert [m["content"] for m in records[1]["prompt"]] == ["Hi", "Hello!", "Insult me."]
    assert records[2]["prompt"] == "q3"
    with pytest.raises(RecordsError, match=r"bad.jsonl:1: `chosen` is not an hh-rlhf transcript"):
        read_prompts(jsonl(tmp_path / "bad.jsonl", [{"chosen": "just text", "rejected": "x"}]))


def test_ids_are_stable_and_duplicates_fail_with_both_lines(tmp_path):
    path = jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    assert [r["id"] for r in read_prompts(path)] == [r["id"] for r in read_prompts(path)]
    dup = jsonl(tmp_path / "d.jsonl", [{"id": "x", "prompt": "a"}, {"id": "y", "prompt": "b"}, {"id": "x", "prompt": "c"}])
    with pytest.raises(RecordsError, match=r"d.jsonl:3: duplicate id 'x' \(first seen on line 1\)"):
        read_prompts(dup)
    # Without ids, the derived ones collide on the same prompt: that is what the message says.
    same = jsonl(tmp_path / "s.jsonl", [{"prompt": "Write a poem"}, {"prompt": "Tell a joke"}, {"prompt": "Write a poem"}])
    with pytest.raises(RecordsError, match=r"s.jsonl:3: the same prompt as line 1 -- remove one"):
        read_prompts(same)
    with_ids = jsonl(tmp_path / "i.jsonl", [{"id": "a", "prompt": "Write a poem"}, {"id": "b", "prompt": "Write a poem"}])
    assert [r["id"] for r in read_prompts(with_ids)] == ["a", "b"]
    # A null id, or a blank CSV cell, gives no id: one is derived, as if the column were absent.
    blank = tmp_path / "b.csv"
    blank.write_text("id,prompt\n,first question\n,second question\n")
    assert len({r["id"] for r in read_prompts(blank)}) == 2
    nulls = jsonl(tmp_path / "n.jsonl", [{"id": None, "prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}
                                         for i in range(3)])
    assert len({r["id"] for r in read_preferences(nulls)}) == 3 and "None" not in {r["id"] for r in read_preferences(nulls)}


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": oops}\n{"prompt": "fine"}\n')
    with pytest.raises(RecordsError, match=r"bad.jsonl:2: not valid JSON"):
        read_prompts(path)
    path.write_text('{"prompt": "ok"}\n["a list"]\n')
    with pytest.raises(RecordsError, match=r"bad.jsonl:2: expected a JSON object.*\{\"prompt\": \"...\"\}"):
        read_prompts(path)
    path.write_text('["a list"]\n')
    with pytest.raises(RecordsError, match=r"bad.jsonl:1: expected a JSON object.*\"chosen\": \"...\""):
        read_preferences(path)  # each reader shows its own format
    path.write_text('{"text": "no prompt column"}\n')
    with pytest.raises(RecordsError, match=r"bad.jsonl:1: no prompt found"):
        read_prompts(path)


def test_a_broken_last_line_is_an_error_not_a_dropped_record(tmp_path):
    """A torn line in cai's own output is RecordWriter's to repair (tested below); in a file a user gives,
    dropping it silently would lose the record."""
    path = tmp_path / "t.jsonl"
    path.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "pro')
    with pytest.raises(RecordsError, match=r"t.jsonl:2: not valid JSON"):
        list(read_jsonl(path))
    with pytest.raises(RecordsError, match=r"t.jsonl:2: not valid JSON .*no newline: was the file cut short"):
        read_prompts(path)


def test_gzipped_files_read_like_plain_ones_and_errors_name_them(tmp_path):
    import gzip

    lines = '{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n'
    path = tmp_path / "p.jsonl.gz"
    path.write_bytes(gzip.compress(lines.encode()))
    assert [r["id"] for r in read_prompts(path)] == ["a", "b"]
    upper = tmp_path / "P.JSONL.GZ"
    upper.write_bytes(gzip.compress(lines.encode()))
    assert [r["id"] for r in read_prompts(upper)] == ["a", "b"]
    path.write_bytes(gzip.compress((lines + "{broken\n").encode()))
    with pytest.raises(RecordsError, match=rf"^{path}:3: not valid JSON"):
        read_prompts(path)
    preferences = tmp_path / "prefs.jsonl.gz"
    preferences.write_bytes(gzip.compress(b'{"prompt": "x", "chosen": "a", "rejected": "b"}\n{broken\n'))
    with pytest.raises(RecordsError, match=rf"^{preferences}:2: not valid JSON"):  # not a temporary file's name
        read_preferences(preferences)
    path.write_bytes(gzip.compress(lines.encode())[:-8])  # a download cut short
    with pytest.raises(RecordsError, match="not a complete gzip file"):
        read_prompts(path)


def test_plain_text_prompts_one_per_line_and_a_text_file_named_jsonl_says_so(tmp_path):
    text = tmp_path / "p.txt"
    text.write_bytes("How do I pick a lock?\r\n\n  Write a poem  \nOne prompt\u2028on two lines\n".encode())
    records = read_prompts(text)
    assert [r["prompt"] for r in records] == ["How do I pick a lock?", "Write a poem", "One prompt\u2028on two lines"]
    assert records[0]["id"] == read_prompts(text)[0]["id"]  # derived from the text: stable across reads
    misnamed = tmp_path / "p.jsonl"
    misnamed.write_text("How do I pick a lock?\n")
    with pytest.raises(RecordsError, match=r"p.jsonl:1: not valid JSON .*name the file .txt"):
        read_prompts(misnamed)


def test_byte_order_marks_and_empty_prompts(tmp_path):
    csv_path = tmp_path / "excel.csv"
    csv_path.write_bytes("\ufeffprompt,category\nHow do I fix a bike?,benign\n".encode())
    assert read_prompts(csv_path)[0]["prompt"] == "How do I fix a bike?"
    jsonl_path = tmp_path / "bom.jsonl"
    jsonl_path.write_bytes('\ufeff{"prompt": "hi"}\n'.encode())
    assert read_prompts(jsonl_path)[0]["prompt"] == "hi"
    jsonl_path.write_text('{"prompt": "hi"}\n{"prompt": "  "}\n')
    with pytest.raises(RecordsError, match=r"bom.jsonl:2: `prompt` is empty"):
        read_prompts(jsonl_path)
    # A prompt that is there but not text is not called empty (it was: "`prompt` is empty" for 5).
    for value, shown in [("5", "int 5"), ("true", "bool True"), ('{"text": "hi"}', "dict {'text': 'hi'}")]:
        jsonl_path.write_text(f'{{"prompt": "hi"}}\n{{"goal": {value}}}\n')
        with pytest.raises(RecordsError, match=rf"bom.jsonl:2: `goal` must be text, got {re.escape(shown)}"):
            read_prompts(jsonl_path)


def test_hh_transcripts_single_and_multi_turn():
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How do I boil an egg?\n\nAssistant: Simmer it 9 minutes."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How do I boil an egg?\n\nAssistant: No idea."
    messages = parse_transcript(chosen)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    conversation, c, r = split_transcript_pair(chosen, rejected)
    assert [m["content"] for m in conversation] == ["Hi", "Hello!", "How do I boil an egg?"]
    assert (c, r) == ("Simmer it 9 minutes.", "No idea.")
    with pytest.raises(ValueError, match="share"):
        split_transcript_pair(chosen, rejected.replace("Hi", "Hey"))


@pytest.mark.parametrize("content", [None, [{"type": "text", "text": "hi"}], {"text": "hi"}])
def test_a_message_whose_content_is_not_text_names_its_line(tmp_path, content):
    """Not the prompt "None" or a Python repr of content parts sent to the model."""
    path = jsonl(tmp_path / "m.jsonl", [{"prompt": "ok"}, {"messages": [{"role": "user", "content": content}]}])
    with pytest.raises(RecordsError, match=r"m.jsonl:2: a user message's content is \w+, not text"):
        read_prompts(path)
    prefs = jsonl(tmp_path / "prefs.jsonl", [{"prompt": "q", "chosen": [{"role": "assistant", "content": content}],
                                              "rejected": "bad"}])
    with pytest.raises(RecordsError, match=r"prefs.jsonl:1: .*not text -- .* in `chosen`"):
        read_preferences(prefs)


BAD_PROMPTS = {
    "empty text": "",
    "blank text": "  \n",
    "a number": 5,
    "null": None,
    "no messages": [],
    "a message without content": [{"role": "user"}],
    "an unknown role": [{"role": "human", "content": "hi"}],
    "non-text content": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
}


@pytest.mark.parametrize("prompt", BAD_PROMPTS.values(), ids=BAD_PROMPTS.keys())
def test_a_bad_prompt_fails_the_same_way_in_every_reader_of_records_with_a_prompt(tmp_path, prompt):
    """Preferences (pm train, dpo, pm eval), critique records (sft) and records to score (pm score)."""
    from cai.stages import pm, sft
    from cai.stages.base import StageContext

    path = tmp_path / "in.jsonl"
    readers = {
        "preferences": ({"prompt": "q", "chosen": "a", "rejected": "b"}, lambda: read_preferences(path)),
        "critique records": ({"id": "x", "prompt": "q", "final": "a"}, lambda: sft._read_critique_records(str(path))),
        "records to score": ({"prompt": "q", "response": "a"},
                             lambda: pm.run_score(pm.PMScoreConfig(model="unread", input=str(path)), StageContext())),
    }
    messages = {}
    for name, (good, read) in readers.items():
        jsonl(path, [good, {**good, "id": "y", "prompt": prompt}])
        with pytest.raises(RecordsError) as error:
            read()
        messages[name] = str(error.value)
    assert len(set(messages.values())) == 1, messages
    assert messages["preferences"].startswith(f"{path}:2: ") and "`prompt`" in messages["preferences"]
    assert " -- " in messages["preferences"]  # and says what to give instead


def test_preference_formats_normalise_to_one_shape(tmp_path):
    rows = [
        {"chosen": "\n\nHuman: q1\n\nAssistant: good", "rejected": "\n\nHuman: q1\n\nAssistant: bad"},
        {"prompt": [{"role": "user", "content": "q2"}], "chosen": [{"role": "assistant", "content": "good"}],
         "rejected": [{"role": "assistant", "content": "bad"}]},
        {"chosen": [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "good"}],
         "rejected": [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "bad"}]},
        {"id": "ai-1", "prompt": "q4", "chosen": "good", "rejected": "bad", "p_chosen": 0.7, "source": "ai-harmless",
         "p_a": 0.7},
    ]
    prefs = read_preferences(jsonl(tmp_path / "prefs.jsonl", rows))
    assert [p["chosen"] for p in prefs] == ["good"] * 4 and [p["rejected"] for p in prefs] == ["bad"] * 4
    assert prefs[0]["prompt"] == "q1" and prefs[2]["prompt"] == "q3"
    assert prefs[1]["prompt"] == [{"role": "user", "content": "q2"}]
    assert [p["p_chosen"] for p in prefs] == [1.0, 1.0, 1.0, 0.7]
    assert [p["source"] for p in prefs] == ["human-helpful"] * 3 + ["ai-harmless"]
    assert prefs[3]["id"] == "ai-1" and prefs[3]["p_a"] == 0.7


def test_writer_resumes_after_a_kill_without_duplicates_or_loss(tmp_path):
    path = tmp_path / "out.jsonl"
    with RecordWriter(path) as out:
        for i in range(3):
            out.append({"id": f"r{i}", "value": i})
    # A kill in the middle of writing record 3 leaves a torn line.
    with path.open("a") as handle:
        handle.write('{"id": "r3", "val')
    with RecordWriter(path) as out:
        assert out.done_ids == {"r0", "r1", "r2"} and out.torn_lines == 1
        for i in range(6):  # the resumed run replays everything; finished ids are skipped
            if f"r{i}" not in out.done_ids:
                out.append({"id": f"r{i}", "value": i})
        assert out.append({"id": "r0", "value": 0}) is False and out.duplicates_skipped == 1
    ids = [obj["id"] for _, obj in read_jsonl(path)]
    assert ids == [f"r{i}" for i in range(6)]


def test_resume_makes_only_what_a_killed_run_left_and_keeps_the_items_order(tmp_path):
    from cai.records import Resume

    path = tmp_path / "out.jsonl"
    items = [{"id": f"p{i}"} for i in range(7)]
    made = []

    def make(chunk):
        made.append([item["id"] for item in chunk])
        return [{"id": item["id"], "n": int(item["id"][1:])} for item in chunk]

    with pytest.raises(KeyboardInterrupt), Resume(path, items, chunk_size=3) as resume:
        for number, chunk in enumerate(resume):
            if number == 1:
                raise KeyboardInterrupt  # killed while making the second chunk: the first is on disk
            resume.write(make(chunk))
    with path.open("a") as handle:
        handle.write('{"id": "p3", "n"')  # and a torn line from the kill
    made.clear()
    with Resume(path, items, chunk_size=3, skip={"p5"}) as resume:  # p5: set aside in another file
        assert resume.done == 4 and [item["id"] for item in resume.todo] == ["p3", "p4", "p6"]
        for chunk in resume:
            resume.write(make(chunk))
        resume.write([{"id": "p0", "n": -1}])  # an id already there is never written twice
    assert made == [["p3", "p4", "p6"]]
    assert [r["id"] for r in resume.records()] == ["p0", "p1", "p2", "p3", "p4", "p6"]
    assert [r["n"] for r in resume.records()] == [0, 1, 2, 3, 4, 6]
    ids = [r["id"] for _, r in read_jsonl(path)]
    assert sorted(ids) == ["p0", "p1", "p2", "p3", "p4", "p6"] and len(ids) == len(set(ids))
    with Resume(path, [], chunk_size=2) as resume:  # items added in rounds share one open file
        resume.add([{"id": "p5"}, {"id": "p1"}])
        assert [item["id"] for chunk in resume for item in chunk] == ["p5"] and resume.done == 1


def test_writer_refuses_a_corrupt_middle_line(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(RecordsError, match=r"out.jsonl:2"):
        RecordWriter(path)


@pytest.mark.parametrize("n_ai, n_human, fraction", [(100, 300, 0.43), (100, 20, 0.43), (57, 43, 0.43), (10, 10, 0.25)])
def test_mix_reaches_the_fraction_and_reports_counts(n_ai, n_human, fraction):
    ai = [{"id": f"a{i}", "source": "ai-harmless"} for i in range(n_ai)]
    human = [{"id": f"h{i}", "source": "human-helpful"} for i in range(n_human)]
    mix = mix_preferences(ai, human, fraction, seed=1)
    humans = sum(r["source"] == "human-helpful" for r in mix.records)
    assert humans == mix.human_used and len(mix.records) - humans == mix.ai_used
    assert abs(humans - fraction * len(mix.records)) <= 1
    assert str(mix.ai_used) in mix.summary() and str(mix.human_used) in mix.summary()


def test_a_short_side_is_repeated_evenly_and_at_most_max_repeats_times():
    from collections import Counter

    from cai.records import MAX_REPEATS

    ai = [{"id": f"a{i}", "source": "ai-harmless"} for i in range(58)]
    human = [{"id": f"h{i}", "source": "human-helpful"} for i in range(86)]
    mix = mix_preferences(ai, human, 0.425, seed=1)  # the demo's sizes: every AI pair exactly twice
    assert (mix.ai_used, mix.human_used, mix.resampled) == (116, 86, "AI")
    assert set(Counter(r["id"] for r in mix.records if r["source"] == "ai-harmless").values()) == {2}

    few = ai[:10]  # 10 AI pairs against 1000 human ones: 10 x 4 AI, the human side sampled down to fit
    many = [{"id": f"h{i}", "source": "human-helpful"} for i in range(1000)]
    mix = mix_preferences(few, many, 0.425, seed=1)
    uses = Counter(r["id"] for r in mix.records)
    assert mix.ai_used == 10 * MAX_REPEATS and all(uses[r["id"]] == MAX_REPEATS for r in few)
    assert mix.human_used == 30 and max(uses[r["id"]] for r in many) == 1
    assert "sampled down" in mix.summary()


def test_mix_without_human_says_so():
    mix = mix_preferences([{"id": "a", "source": "ai-harmless"}], [], 0.43)
    assert mix.human_used == 0 and "AI labels alone" in mix.summary()


@pytest.mark.parametrize("value, problem", [("high", "is not a number"), (True, "is not a number"),
                                            (1.5, "is not a probability")])
def test_a_bad_p_chosen_names_its_line(tmp_path, value, problem):
    path = jsonl(tmp_path / "prefs.jsonl", [{"prompt": "x", "chosen": "a", "rejected": "b"},
                                            {"prompt": "y", "chosen": "a", "rejected": "b", "p_chosen": value}])
    with pytest.raises(RecordsError, match=rf"prefs.jsonl:2: p_chosen={value!r} {problem}"):
        read_preferences(path)


def test_hh_transcripts_with_windows_line_ends_are_still_transcripts(tmp_path):
    chosen = "\r\n\r\nHuman: How do I pick a lock?\r\n\r\nAssistant: I can't help with that."
    rejected = "\r\n\r\nHuman: How do I pick a lock?\r\n\r\nAssistant: Use a tension wrench."
    [record] = read_preferences(jsonl(tmp_path / "hh.jsonl", [{"chosen": chosen, "rejected": rejected}]))
    assert (record["prompt"], record["chosen"]) == ("How do I pick a lock?", "I can't help with that.")


def test_a_bundled_data_path_is_found_from_any_directory_and_hashed_by_its_content(tmp_path, monkeypatch):
    """`cai critique --prompts data/red_team_prompts.jsonl` from outside a checkout (an installed cai)."""
    from cai.manifest import input_hash
    from cai.paths import bundled

    expected = read_prompts(bundled("data/red_team_prompts.jsonl"))
    monkeypatch.chdir(tmp_path)
    assert read_prompts("data/red_team_prompts.jsonl") == expected
    assert input_hash("data/red_team_prompts.jsonl") == input_hash(bundled("data/red_team_prompts.jsonl"))
    (tmp_path / "data").mkdir()  # a file of the user's own by that name comes first
    jsonl(tmp_path / "data" / "red_team_prompts.jsonl", [{"prompt": "mine"}])
    assert [r["prompt"] for r in read_prompts("data/red_team_prompts.jsonl")] == ["mine"]
