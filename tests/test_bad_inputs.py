"""Inputs a careless user or an attacker gives: each fails at once with one line naming the file (and line)
and the fix, exit code 1 from the CLI, never a traceback, never unbounded memory or time."""

import gzip
import json
import os
import subprocess
import sys
import threading

import pytest
import yaml

from cai import constitution as c
from cai import records
from cai.errors import ConfigError, RecipeError, RecordsError
from cai.recipe import load as load_recipe

CONSTITUTION = c.bundled("constitutions/short.yaml")


def cai_main(monkeypatch, capsys, *argv: str) -> str:
    """Run `cai ARGV` in this process; its stderr, after asserting exit 1 with one `error:` line."""
    import cai.cli

    monkeypatch.setattr(sys, "argv", ["cai", *argv])
    with pytest.raises(SystemExit) as exited:
        cai.cli.main()
    err = capsys.readouterr().err
    assert exited.value.code == 1, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- bounded inputs ---------------------------------------------------------------------------------


def test_a_jsonl_line_over_the_limit_fails_naming_its_line_the_limit_and_how_to_raise_it(tmp_path, monkeypatch):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n' + json.dumps({"prompt": "x" * (5 * 2**20)}) + "\n")
    with pytest.raises(RecordsError) as raised:
        records.read_prompts(path)
    assert str(raised.value).startswith(f"{path}:2: the line is over the 4 MB limit")
    assert "CAI_MAX_LINE_MB=" in str(raised.value)
    monkeypatch.setenv("CAI_MAX_LINE_MB", "8")
    assert len(records.read_prompts(path)) == 2
    monkeypatch.setenv("CAI_MAX_LINE_MB", "lots")
    with pytest.raises(ConfigError, match="CAI_MAX_LINE_MB='lots' is not a size"):
        records.read_prompts(path)


def test_an_input_file_over_the_limit_fails_and_a_gz_counts_unpacked(tmp_path, monkeypatch):
    monkeypatch.setenv("CAI_MAX_INPUT_MB", "0.01")  # 10 KB
    lines = "".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(1000))  # ~26 KB
    for name, data in (("p.jsonl", lines.encode()), ("p.jsonl.gz", gzip.compress(lines.encode())),
                       ("p.txt", lines.encode()), ("p.csv", b"prompt\n" + lines.encode().replace(b'"', b""))):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(RecordsError) as raised:
            records.read_prompts(path)
        assert str(raised.value).startswith(f"{path}: ") and "over the 0.01 MB limit" in str(raised.value)
        assert "CAI_MAX_INPUT_MB=" in str(raised.value)


def test_a_device_or_a_pipe_is_refused_without_reading_it(tmp_path):
    fifo = tmp_path / "prompts.jsonl"
    os.mkfifo(fifo)
    # A writer that gives one prompt and closes, so a reader that opens the pipe gets a record, not a hang.
    writer = threading.Thread(target=lambda: fifo.write_text('{"prompt": "hi"}\n'), daemon=True)
    writer.start()
    try:
        with pytest.raises(RecordsError, match=r"not a regular file .* save a stream to a file first"):
            records.read_prompts(fifo)
    finally:  # a reader end that does not wait for a writer, so the writer finishes either way
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        writer.join(5)
        os.close(reader)
    # /dev/zero is endless: a reader that opens it eats memory until it dies (here: 1 GB of address space).
    for reader in ("records.read_prompts('/dev/zero')", "constitution.load('/dev/zero')",
                   "recipe.load('/dev/zero')"):
        code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))\n"
                f"from cai import constitution, records, recipe\nfrom cai.errors import CaiError\n"
                f"try:\n    {reader}\nexcept CaiError as exc:\n    print(exc)\n")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert result.stdout.startswith("/dev/zero: not a regular file"), (reader, result.stdout, result.stderr[-300:])


def test_a_constitution_over_its_size_limit_is_one_problem(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text(CONSTITUTION.read_text() + "# padding\n" * 120_000)
    problems = c.validate(path)
    assert len(problems) == 1 and problems[0].startswith(f"{path}: the file is 1.") and "over the 1 MB limit" in problems[0]
    assert "split it or trim it" in problems[0]


@pytest.mark.skipif(not yaml.__with_libyaml__, reason="PyYAML built without libyaml")
def test_yaml_is_read_with_the_c_loader_and_errors_keep_their_line(tmp_path, monkeypatch):
    loaders = []
    compose = yaml.compose
    monkeypatch.setattr(yaml, "compose", lambda text, Loader: loaders.append(Loader) or compose(text, Loader=Loader))
    assert c.load(CONSTITUTION).critique_principles
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: embedded:tiny-random\nstages: [critique]\ncritique:\n  revisions: [1,\n")
    with pytest.raises(RecipeError, match=rf"^{recipe}:5: not valid YAML"):
        load_recipe(recipe)
    assert loaders == [yaml.CSafeLoader, yaml.CSafeLoader]
    bad = tmp_path / "c.yaml"
    bad.write_text(CONSTITUTION.read_text().replace("critique_principles:", "critique_principles:\n  - id: [", 1))
    assert ":" in c.validate(bad)[0] and c.validate(bad)[0].split(":")[1].isdigit()


# -- one line, never a traceback ----------------------------------------------------------------------


def test_an_invalid_utf8_byte_in_a_recipe_names_its_line(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"model: embedded:tiny-random\n# caf\xff\nstages: [critique]\n")
    err = cai_main(monkeypatch, capsys, "run", str(recipe), "--name", "t")
    assert err.startswith(f"error: {recipe}:2: byte 0xff is not UTF-8 text -- save the file as UTF-8"), err


@pytest.mark.parametrize("name", ["p.csv", "p.txt", "p.jsonl"])
def test_an_invalid_utf8_byte_in_a_prompt_file_names_its_line(tmp_path, monkeypatch, capsys, name):
    path = tmp_path / name
    body = {"p.csv": b"prompt\nhello\nbad \xff\n", "p.txt": b"hello\nbad \xff\n",
            "p.jsonl": b'{"prompt": "hello"}\n{"prompt": "bad \xff"}\n'}[name]
    path.write_bytes(body)
    line = 3 if name == "p.csv" else 2
    err = cai_main(monkeypatch, capsys, "critique", "--prompts", str(path), "--out", str(tmp_path / "o.jsonl"),
                   "-m", "embedded:tiny-random")
    assert err.startswith(f"error: {path}:{line}: byte 0xff is not UTF-8 text -- save the file as UTF-8"), err


def test_a_jsonl_line_nested_100000_deep_is_one_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"prompt": "hi"}\n{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    err = cai_main(monkeypatch, capsys, "critique", "--prompts", str(path), "--out", str(tmp_path / "o.jsonl"),
                   "-m", "embedded:tiny-random")
    assert err.startswith(f"error: {path}:2: JSON nested too deeply to read"), err
    deep = tmp_path / "deep.yaml"
    deep.write_text("model: embedded:tiny-random\nstages: [critique]\ncritique:\n  x: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(RecipeError, match=rf"^{deep}"):
        load_recipe(deep)


def test_a_model_whose_pickle_the_safe_loader_refuses_is_one_line(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import shutil

    import torch
    from safetensors.torch import load_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    state = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    state["note"] = threading.Lock  # a class: weights_only loading refuses to build it
    torch.save(state, model / "pytorch_model.bin")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    err = cai_main(monkeypatch, capsys, "critique", "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"),
                   "-m", str(model))
    assert err.startswith(f"error: {model}: pytorch_model.bin holds Python objects beyond tensors"), err
    assert "use a model saved as safetensors" in err


def test_a_prompt_longer_than_the_context_stops_before_generating(tmp_path, monkeypatch, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": "' + "word " * 3000 + '"}\n')
    err = cai_main(monkeypatch, capsys, "critique", "--prompts", str(path), "--out", str(tmp_path / "o.jsonl"),
                   "-m", "embedded:tiny-random", "--max-new-tokens", "8")
    # The tiny model reads 2,048 tokens.
    assert err.startswith(f"error: {path}:2: prompt 'b' is ") and "over the 2,040 that fit" in err, err
    assert "--max-new-tokens 8" in err and "shorten or remove it" in err
    assert not (tmp_path / "o.jsonl").exists() or not (tmp_path / "o.jsonl").read_text()


# -- smaller ones -------------------------------------------------------------------------------------


def test_an_hh_rlhf_transcript_without_an_assistant_turn_is_one_user_turn(tmp_path, tiny_engine):
    path = tmp_path / "p.jsonl"
    lines = [{"chosen": "\n\nHuman: How do I pick a lock?\n\nHuman: It is my own door."},
             {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nHuman: d\n\nAssistant: e"}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    first, second = records.read_prompts(path)
    assert first["prompt"] == "How do I pick a lock?\n\nIt is my own door."
    assert [m["role"] for m in second["prompt"]] == ["user", "assistant", "user"]
    assert second["prompt"][-1]["content"] == "c\n\nd"
    assert tiny_engine.render(records.as_messages(first["prompt"])).count("<|im_start|>user") == 1


@pytest.mark.parametrize(("value", "kept"), [('"p-1"', "p-1"), ("5", "5"), ("null", None)])
def test_a_string_or_a_whole_number_is_an_id_and_null_derives_one(tmp_path, value, kept):
    path = tmp_path / "p.jsonl"
    path.write_text(f'{{"id": {value}, "prompt": "hi"}}\n')
    record_id = records.read_prompts(path)[0]["id"]
    assert record_id == kept if kept else record_id.startswith("p-")


@pytest.mark.parametrize("value", ["[1]", '{"n": 1}', "true", "1.5"])
def test_an_id_that_is_not_text_or_a_whole_number_is_refused(tmp_path, value):
    prompts, prefs = tmp_path / "p.jsonl", tmp_path / "prefs.jsonl"
    prompts.write_text(f'{{"prompt": "a"}}\n{{"id": {value}, "prompt": "hi"}}\n')
    prefs.write_text(f'{{"id": {value}, "prompt": "hi", "chosen": "a", "rejected": "b"}}\n')
    for path, read, line in ((prompts, records.read_prompts, 2), (prefs, records.read_preferences, 1)):
        with pytest.raises(RecordsError) as raised:
            read(path)
        assert str(raised.value).startswith(f"{path}:{line}: `id` must be text or a whole number, got {value}")
        assert 'write it as a string, e.g. "id": "p-1"' in str(raised.value)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused_anywhere_in_a_line(tmp_path, constant):
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n'
                    f'{{"prompt": "hi", "chosen": "a", "rejected": "b", "p_chosen": 0.9, "score": {constant}}}\n')
    with pytest.raises(RecordsError, match=rf"^{path}:2: {constant} is not a number JSON allows -- write a number"):
        records.read_preferences(path)


def test_a_bad_run_name_is_blamed_on_where_it_was_given(tmp_path, monkeypatch, capsys):
    smoke = c.bundled("recipes/smoke.yaml")
    err = cai_main(monkeypatch, capsys, "run", str(smoke), "--name", "x y", "--runs-dir", str(tmp_path))
    assert err == ("error: --name 'x y' is not a run name: letters, digits, - and _ only (it names runs/NAME) "
                   "-- e.g. --name my-run")
    named = tmp_path / "named.yaml"
    named.write_text(smoke.read_text().replace("name: smoke", "name: x/y"))
    with pytest.raises(RecipeError, match=rf"^{named}:4: name 'x/y' is not a run name.* -- e.g. name: my-run$"):
        load_recipe(named, runs_dir=tmp_path)
    assert load_recipe(named, name="ok_name-2", runs_dir=tmp_path).name == "ok_name-2"
    dotted = tmp_path / "my.recipe.yaml"
    dotted.write_text(smoke.read_text().replace("name: smoke", ""))
    with pytest.raises(RecipeError, match=r"named after the recipe file.* add `name: my-run` to the recipe"):
        load_recipe(dotted, runs_dir=tmp_path)


def test_cai_reads_back_its_own_metric_log_with_a_nan_step(tmp_path):
    from cai.stages.rl import Monitor

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "kl": 0.1}\n{"step": 2, "kl": NaN}\n')
    assert [row["step"] for row in Monitor(tmp_path / "metrics.jsonl").history] == [1, 2]
