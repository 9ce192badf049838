"""Recipes and the runner, on fake stages that follow the stage contract (Manifest manifests, RecordWriter)
but do no ML: they copy their inputs into their outputs and count how often they did work."""

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from cai import recipe as recipes
from cai.errors import RecipeError
from cai.manifest import Manifest, StageResult
from cai.records import RecordWriter, read_jsonl, read_prompts
from cai.stages.base import NullReporter

CALLS: dict[str, int] = {}
CRASH_AFTER: dict[str, int] = {}  # stage -> raise KeyboardInterrupt after this many records


def _f(default, hash_=True, **kw):
    metadata = {"help": "fake"}
    if not hash_:
        metadata["hash"] = False
    if callable(default):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class FakeCritiqueConfig:
    prompts: str = _f("")
    model: str = _f("m")
    constitution: str = _f("default")
    revisions: int = _f(1)
    limit: int | None = _f(None)
    temperature: float = _f(0.7)
    seed: int = _f(0)
    out: str = _f("", hash_=False)
    batch_size: int = _f(4, hash_=False)

    def __post_init__(self):
        from cai.errors import ConfigError

        if self.revisions < 0:
            raise ConfigError(f"--revisions {self.revisions}: use 0 or more")


@dataclass
class FakeSftConfig:
    data: str = _f("")
    model: str = _f("m")
    helpful: str | None = _f(None)
    epochs: int = _f(1)
    quantize: str | None = _f(None)
    seed: int = _f(0)
    out: str = _f("", hash_=False)


@dataclass
class FakeFeedbackConfig:
    prompts: str = _f("")
    model: str = _f("")
    judge: str = _f("m")
    constitution: str = _f("default")
    method: str = _f("mc")
    seed: int = _f(0)
    out: str = _f("", hash_=False)


@dataclass
class FakePmConfig:
    ai: str = _f("")
    human: str | None = _f(None)
    human_fraction: float = _f(0.5)
    model: str = _f("m")
    seed: int = _f(0)
    out: str = _f("", hash_=False)


@dataclass
class FakeRlConfig:
    model: str = _f("")
    pm: str = _f("")
    prompts: list[str] = _f(list)
    constitution: str = _f("default")
    beta: float = _f(0.05)
    rewards: list[str] = _f(list)
    seed: int = _f(0)
    out: str = _f("", hash_=False)


@dataclass
class FakeFilterConfig:
    prompts: str = _f("")
    model: str = _f("")
    seed: int = _f(0)
    out: str = _f("", hash_=False)


@dataclass
class FakeDpoConfig:
    model: str = _f("")
    ai: str = _f("")
    human: str | None = _f(None)
    seed: int = _f(0)
    out: str = _f("", hash_=False)


@dataclass
class FakeEvalConfig:
    models: list[str] = _f(list)
    harmful: str = _f("")
    benign: str = _f("")
    verifiable: str | None = _f(None)
    judge: str | None = _f(None)
    constitution: str = _f("default")
    pm: str | None = _f(None)
    limit: int | None = _f(None)
    out: str = _f("", hash_=False)


INPUT_FIELDS = ("prompts", "data", "helpful", "model", "ai", "human", "pm", "harmful", "benign")


def _fake_run(name: str):
    def run(cfg, ctx) -> StageResult:
        inputs = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name in INPUT_FIELDS}
        if name == "eval":
            inputs.update({f"model{i}": m.split("=", 1)[1] for i, m in enumerate(cfg.models)})
        manifest = Manifest(name, cfg, ctx.manifest_for(cfg.out), inputs=inputs, outputs=[cfg.out])
        if (done := manifest.previous()) is not None:
            return done
        manifest.start()
        CALLS[name] = CALLS.get(name, 0) + 1
        out = Path(cfg.out)
        if out.suffix == ".jsonl":
            source = cfg.prompts
            with RecordWriter(out) as writer:
                for index, record in enumerate(read_prompts(source, getattr(cfg, "limit", None))):
                    if name in CRASH_AFTER and writer.written >= CRASH_AFTER[name]:
                        raise KeyboardInterrupt
                    writer.append({"id": record["id"], "prompt": record["prompt"], "n": index,
                                   "made_by": manifest.config_hash, "from": manifest.inputs})
            count = len(writer.done_ids)
        else:
            model = out if out.name == "model" or name == "eval" else out / "model"  # as pm and rl write
            model.mkdir(parents=True, exist_ok=True)
            (model / "config.json").write_text(json.dumps({"stage": name, **{k: str(v) for k, v in inputs.items()}}))
            count = 1
        return manifest.complete(outputs={"out": out}, counts={"records": count}, summary=f"{name} did {count}")

    return run


FAKES = {"critique": FakeCritiqueConfig, "sft": FakeSftConfig, "feedback": FakeFeedbackConfig, "pm": FakePmConfig,
         "filter": FakeFilterConfig, "rl": FakeRlConfig, "dpo": FakeDpoConfig, "eval": FakeEvalConfig}
REGISTRY = tuple(dataclasses.replace(spec, loader=(lambda n=spec.name: (FAKES[n], _fake_run(n))))
                 for spec in recipes.STAGES)


@pytest.fixture(autouse=True)
def _reset():
    CALLS.clear()
    CRASH_AFTER.clear()


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"request {i}"}) + "\n" for i in range(6)))
    return path


def write_recipe(tmp_path, text: str, prompts_path: Path) -> Path:
    path = tmp_path / "r.yaml"
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"prompt": "request 0", "chosen": "yes", "rejected": "no"}) + "\n")
    files = {"red_team": prompts_path, "helpful": prompts_path, "human_prefs": prefs, "eval_harmful": prompts_path,
             "eval_benign": prompts_path}
    data_block = "\n".join(f"  {key}: {file}" for key, file in files.items())
    path.write_text(f"name: t\nmodel: base-model\ndata:\n{data_block}\n{text}")
    return path


def load(path, overrides=(), **kw):
    return recipes.load(path, list(overrides), runs_dir=path.parent / "runs", registry=REGISTRY, **kw)


def run(path, overrides=(), **kw):
    recipe = load(path, overrides)
    return recipes.run(recipe, NullReporter(), **kw)


# ----------------------------------------------------------------------------- loading and errors


def test_wiring_and_precedence(tmp_path, prompts):
    path = write_recipe(tmp_path, "seed: 3\nsft:\n  epochs: 2\nrl:\n  beta: 1\n", prompts)
    recipe = load(path, ["sft.epochs=5", "critique.revisions=2"])
    run_dir = (tmp_path / "runs" / "t").resolve()
    critique, sft = recipe.stage("critique").config, recipe.stage("sft").config
    assert critique.out == str(run_dir / "1-critique" / "records.jsonl")
    assert critique.prompts == str(prompts.resolve()) and critique.model == "base-model"
    assert critique.revisions == 2 and critique.seed == 3  # --set, then top-level seed shared
    assert sft.data == critique.out and sft.epochs == 5  # --set beats the recipe's 2
    assert recipe.stage("feedback").config.model == str(run_dir / "2-sft" / "model")
    assert recipe.stage("feedback").config.judge == "base-model"  # judge defaults to the base model
    rl = recipe.stage("rl").config
    assert rl.pm == str(run_dir / "4-pm" / "model") and rl.beta == 1.0 and isinstance(rl.beta, float)
    assert recipe.stage("eval").config.models == ["base=base-model", f"sl={run_dir / '2-sft' / 'model'}",
                                                  f"rl={run_dir / '5-rl' / 'model'}"]
    assert recipe.stage("eval").config.pm == str(run_dir / "4-pm" / "model")
    assert FakeCritiqueConfig().revisions == 1  # defaults untouched


def test_rl_reads_the_filtered_prompts_when_the_recipe_filters(tmp_path, prompts):
    run_dir = (tmp_path / "runs" / "t").resolve()
    path = write_recipe(tmp_path, "stages: [filter, rl, eval]\nrl:\n  model: base-model\n  pm: none\n", prompts)
    path.write_text(path.read_text().replace("data:\n", f"data:\n  rl_prompts: {prompts}\n"
                                                         f"  eval_verifiable: {prompts}\n"))
    recipe = load(path)
    assert [s.spec.name for s in recipe.stages] == ["filter", "rl", "eval"]
    assert recipe.stage("filter").config.model == "base-model"  # no sft: the recipe's model
    assert recipe.stage("filter").config.prompts == str(prompts.resolve())
    assert recipe.stage("rl").config.prompts == [str(run_dir / "5-filter" / "prompts.jsonl")]
    assert recipe.stage("eval").config.verifiable == str(prompts.resolve())
    # Without the filter, rl reads data.rl_prompts as before.
    path.write_text(path.read_text().replace("stages: [filter, rl, eval]", "stages: [rl, eval]"))
    assert load(path).stage("rl").config.prompts == [str(prompts.resolve())]


def test_unknown_key_names_file_line_and_closest_key(tmp_path, prompts):
    path = write_recipe(tmp_path, "sft:\n  epochs: 2\n  lora_rr: 8\n", prompts)
    with pytest.raises(RecipeError) as error:
        load(path)
    line = path.read_text().splitlines().index("  lora_rr: 8") + 1
    assert f"{path}:{line}:" in str(error.value) and "lora_rr" in str(error.value)
    assert "did you mean" not in str(error.value) or "`" in str(error.value)

    path = write_recipe(tmp_path, "critique:\n  revison: 2\n", prompts)
    with pytest.raises(RecipeError, match=r"unknown key `revison` in critique -- did you mean `revisions`"):
        load(path)
    path = write_recipe(tmp_path, "critque:\n  revisions: 2\n", prompts)
    with pytest.raises(RecipeError, match=r"r.yaml:\d+: unknown key `critque` -- did you mean `critique`"):
        load(path)


def test_a_key_written_twice_is_a_problem_not_the_last_one_winning(tmp_path, prompts):
    path = write_recipe(tmp_path, "critique:\n  revisions: 2\n  revisions: 3\n", prompts)
    with pytest.raises(RecipeError) as error:
        load(path)
    line = len(path.read_text().splitlines())  # the second one
    assert f"r.yaml:{line}: key `critique.revisions` appears twice" in str(error.value)
    path.write_text(path.read_text().replace("data:\n", f"data:\n  helpful: {prompts}\n"))
    with pytest.raises(RecipeError, match="key `data.helpful` appears twice"):
        load(path)


def test_wrong_type_and_all_problems_at_once(tmp_path, prompts):
    path = write_recipe(tmp_path, "sft:\n  epochs: two\nrl:\n  beta: yes\n  rewards: 3\n", prompts)
    with pytest.raises(RecipeError) as error:
        load(path)
    text = str(error.value)
    assert text.startswith("3 problems")
    assert "`sft.epochs` must be int, got 'two'" in text
    assert "`rl.beta` must be float, got True" in text and "`rl.rewards` must be a list of str" in text


def test_set_errors_and_types(tmp_path, prompts):
    path = write_recipe(tmp_path, "", prompts)
    with pytest.raises(RecipeError, match=r"--set sft.epochs=x: `sft.epochs` must be int"):
        load(path, ["sft.epochs=x"])
    with pytest.raises(RecipeError, match=r"--set sft.epoch=2: unknown key `epoch` in sft -- did you mean `epochs`"):
        load(path, ["sft.epoch=2"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load(path, ["sft.epochs"])
    recipe = load(path, ["rl.rewards=[format:0.5, math:1]", "eval.limit=null", "seed=7"])
    assert recipe.stage("rl").config.rewards == ["format:0.5", "math:1"]
    assert recipe.stage("pm").config.seed == 7


def test_missing_files_fail_before_anything_runs(tmp_path, prompts):
    path = write_recipe(tmp_path, "", prompts)
    text = path.read_text().replace(f"red_team: {prompts}", "red_team: nowhere/prompts.jsonl")
    path.write_text(text)
    line = text.splitlines().index("  red_team: nowhere/prompts.jsonl") + 1
    with pytest.raises(RecipeError, match=rf"r.yaml:{line}: data.red_team: no such file 'nowhere/prompts.jsonl'"):
        load(path)
    assert not (tmp_path / "runs").exists()
    path = write_recipe(tmp_path, "model: ./no/such/model\n", prompts)
    with pytest.raises(RecipeError, match="no such directory"):
        load(path)
    path = write_recipe(tmp_path, "judge: embedded:smollm3\n", prompts)
    with pytest.raises(RecipeError, match="unknown embedded model 'embedded:smollm3'"):
        load(path)


def test_a_mistyped_input_in_a_stage_section_fails_at_load_and_keeps_the_finished_stage(tmp_path, prompts):
    # A stage's own input (an override of what the runner wires in) is checked like the top-level keys:
    # found only when the stage ran, the runner would already have discarded its finished output.
    path = write_recipe(tmp_path, "", prompts)
    run(path)
    pm_model = tmp_path / "runs" / "t" / "4-pm" / "model"
    assert pm_model.is_dir()
    for override, message in [("pm.ai=nowhere.jsonl", "`pm.ai`: no such file 'nowhere.jsonl'"),
                              ("pm.model=./no/such/model", "`pm.model`: model './no/such/model': no such directory"),
                              ("sft.data=nowhere.jsonl", "`sft.data`: no such file"),
                              ("critique.constitution=nope", "`critique.constitution`: constitution 'nope'"),
                              ("rl.pm=./no/pm", "`rl.pm`: model './no/pm': no such directory"),
                              ("eval.models=x=./no/model", "`eval.models`: model './no/model'")]:
        with pytest.raises(RecipeError, match=f"--set {override}: {message}"):
            load(path, [override])
    path.write_text(path.read_text() + "pm:\n  ai: nowhere.jsonl\n")
    line = len(path.read_text().splitlines())
    with pytest.raises(RecipeError, match=rf"r.yaml:{line}: `pm.ai`: no such file"):
        load(path)
    assert pm_model.is_dir()
    path = write_recipe(tmp_path, "eval:\n  judge: none\n", prompts)
    assert load(path).stage("eval").config.judge == "none"  # `none` turns a judge off: no path to check


def test_a_stage_may_name_a_model_an_earlier_stage_of_this_run_has_yet_to_write(tmp_path, prompts):
    # The load-time check of a stage's models must not refuse this run's own outputs before they exist:
    # `eval.models: [sl=runs/t/2-sft/model]` in a fresh run failed even `--only critique`.
    path = write_recipe(tmp_path, "", prompts)
    runs = tmp_path / "runs"
    sl = runs / "t" / "2-sft" / "model"
    recipe = load(path, [f"eval.models=[base=base-model, sl={sl}]", f"rl.model={sl}"])
    assert recipe.stage("eval").config.models[-1] == f"sl={sl}"
    with pytest.raises(RecipeError, match="`rl.model`: model .*: no such directory"):  # elsewhere: still checked
        load(path, [f"rl.model={runs / 'other' / '2-sft' / 'model'}"])


def test_a_constitution_with_several_problems_says_how_many_and_where_to_see_them(tmp_path, prompts):
    constitution = tmp_path / "mine.yaml"
    constitution.write_text("name: Mine\ndescripton: x\n")  # a bad name, a typo, both principle lists missing
    path = write_recipe(tmp_path, f"constitution: {constitution}\n", prompts)
    with pytest.raises(RecipeError, match=rf"constitution '{constitution}': .*mine.yaml:\d+: .* \(and \d+ more: "
                                          rf"`cai constitution validate {constitution}` lists them all\)"):
        load(path)
    with pytest.raises(RecipeError, match=r"`critique.constitution`: .* more: `cai constitution validate"):
        load(write_recipe(tmp_path, "", prompts), [f"critique.constitution={constitution}"])


def test_config_post_init_errors_become_recipe_errors(tmp_path, prompts):
    path = write_recipe(tmp_path, "critique:\n  revisions: -1\n", prompts)
    with pytest.raises(RecipeError, match=r"r.yaml:\d+: critique: --revisions -1"):
        load(path)


def test_a_config_check_error_names_the_line_of_the_option_it_is_about(tmp_path, prompts):
    path = write_recipe(tmp_path, "critique:\n  temperature: 0.5\n  limit: 3\n  revisions: -1\n", prompts)
    line = path.read_text().splitlines().index("  revisions: -1") + 1
    with pytest.raises(RecipeError, match=rf"r.yaml:{line}: critique: --revisions -1"):
        load(path)
    path = write_recipe(tmp_path, "critique:\n  temperature: 0.5\n", prompts)  # the value comes from --set
    with pytest.raises(RecipeError, match=r"^--set critique.revisions=-1: critique: --revisions -1"):
        load(path, ["critique.revisions=-1"])


def test_stage_selection_and_missing_upstream(tmp_path, prompts):
    path = write_recipe(tmp_path, "stages: [critique, sft, feedback, dpo, eval]\n", prompts)
    recipe = load(path)
    assert [s.spec.name for s in recipe.stages] == ["critique", "sft", "feedback", "dpo", "eval"]
    assert recipe.stage("eval").config.models[-1].startswith("dpo=")
    assert recipe.stage("eval").config.pm is None  # optional: no pm stage
    path = write_recipe(tmp_path, "stages: [critique, sft, rl, eval]\n", prompts)
    with pytest.raises(RecipeError, match=r"rl needs pm's output \(`rl.pm`\) -- add pm to stages"):
        load(path)
    path = write_recipe(tmp_path, "stages: [critique, sfft]\n", prompts)
    with pytest.raises(RecipeError, match="unknown stage `sfft` in stages -- did you mean `sft`"):
        load(path)


def test_options_of_stages_left_out_of_stages_are_still_checked(tmp_path, prompts):
    path = write_recipe(tmp_path, "stages: [critique]\nsft:\n  epochz: 2\n  helpful: nowhere.jsonl\n", prompts)
    with pytest.raises(RecipeError) as error:
        load(path, ["rl.betaa=1", "pm.human_fraction=x"])
    text = str(error.value)
    line = path.read_text().splitlines().index("  epochz: 2") + 1
    assert text.startswith("3 problems") and f"r.yaml:{line}: unknown key `epochz` in sft" in text
    assert "--set rl.betaa=1: unknown key `betaa` in rl" in text and "`pm.human_fraction` must be float" in text
    assert "nowhere.jsonl" not in text  # files of a stage that does not run are not looked for
    assert [s.spec.name for s in load(write_recipe(tmp_path, "stages: [critique]\nsft:\n  epochs: 2\n",
                                                   prompts)).stages] == ["critique"]

def test_resolved_recipe_round_trips(tmp_path, prompts):
    path = write_recipe(tmp_path, "sft:\n  epochs: 3\n", prompts)
    recipe = load(path)
    written = recipes.write_resolved(recipe)
    again = recipes.load(written, runs_dir=tmp_path / "runs", registry=REGISTRY)
    for first, second in zip(recipe.stages, again.stages, strict=True):
        assert first.config == second.config
    assert yaml.safe_load(written.read_text())["sft"]["epochs"] == 3


# ----------------------------------------------------------------------------- running


def test_second_run_does_no_work(tmp_path, prompts):
    path = write_recipe(tmp_path, "", prompts)
    first = run(path)
    assert CALLS == {name: 1 for name in ("critique", "sft", "feedback", "pm", "rl", "eval")}
    assert not any(o.skipped for o in first.outcomes)
    CALLS.clear()
    second = run(path)
    assert CALLS == {} and all(o.skipped for o in second.outcomes)
    run_dir = tmp_path / "runs" / "t"
    assert (run_dir / "recipe.yaml").exists() and (run_dir / "1-critique" / "manifest.json").exists()
    assert [s["name"] for s in json.loads((run_dir / "run.json").read_text())["stages"]][0] == "critique"


def test_a_moved_run_directory_keeps_its_finished_stages_and_a_change_is_named(tmp_path, prompts):
    path = write_recipe(tmp_path, "", prompts)
    run(path)
    (tmp_path / "runs").rename(tmp_path / "moved")  # paths inside every config change; contents do not
    CALLS.clear()
    moved = recipes.run(recipes.load(path, [], runs_dir=tmp_path / "moved", registry=REGISTRY), NullReporter())
    assert CALLS == {}  # eval's --model list (LABEL=PATH) counts by content too
    assert all(o.skipped for o in moved.outcomes)
    reporter = NullReporter()
    recipes.run(recipes.load(path, ["rl.beta=0.1"], runs_dir=tmp_path / "moved", registry=REGISTRY), reporter)
    assert any(m.startswith("rl: changed since the last run (beta: 0.05 -> 0.1)") for m in reporter.messages), \
        reporter.messages


def test_changing_one_option_reruns_that_stage_and_later_ones(tmp_path, prompts):
    path = write_recipe(tmp_path, "", prompts)
    run(path)
    CALLS.clear()
    run(path, ["pm.human_fraction=0.25"])
    assert CALLS == {"pm": 1, "rl": 1, "eval": 1}
    CALLS.clear()
    run(path, ["pm.human_fraction=0.25", "feedback.method=contrast"])
    assert CALLS == {"feedback": 1, "pm": 1, "rl": 1, "eval": 1}
    CALLS.clear()
    run(path, ["pm.human_fraction=0.25", "feedback.method=contrast", "critique.batch_size=2"])
    assert CALLS == {}  # a non-semantic option (hash False) invalidates nothing


def test_interrupted_stage_resumes_without_duplicates(tmp_path, prompts):
    path = write_recipe(tmp_path, "", prompts)
    CRASH_AFTER["critique"] = 2
    with pytest.raises(KeyboardInterrupt):
        run(path)
    records = tmp_path / "runs" / "t" / "1-critique" / "records.jsonl"
    assert len(list(read_jsonl(records))) == 2
    CRASH_AFTER.clear()
    CALLS.clear()
    run(path)
    ids = [r["id"] for _, r in read_jsonl(records)]
    assert sorted(ids) == [f"p{i}" for i in range(6)] and len(ids) == len(set(ids))
    assert CALLS["critique"] == 1 and CALLS["eval"] == 1


def test_only_from_and_force(tmp_path, prompts):
    path = write_recipe(tmp_path, "", prompts)
    with pytest.raises(RecipeError, match="stage critique has not finished") as error:
        run(path, only="sft")
    # The command it suggests runs into this run directory, not the default runs/.
    assert f"--runs-dir {tmp_path / 'runs'} --name t`" in str(error.value)
    run(path)
    CALLS.clear()
    run(path, only="pm")
    assert CALLS == {}
    run(path, only="pm", force=True)
    assert CALLS == {"pm": 1}
    CALLS.clear()
    run(path, from_stage="rl")
    assert CALLS == {"rl": 1, "eval": 1}
    with pytest.raises(RecipeError, match="--only dpo: not a stage of this recipe"):
        run(path, only="dpo")


def test_progress_callback_and_summary(tmp_path, prompts):
    path = write_recipe(tmp_path, "stages: [critique, sft]\n", prompts)
    seen = []
    run(path, on_stage=lambda index, total, name: seen.append((index, total, name)))
    assert seen == [(0, 2, "critique"), (1, 2, "sft")]
    lines = recipes.summary_lines({"models": {"base": {"harmful_refusal_rate": 0.1, "benign_refusal_rate": 0.0},
                                              "rl": {"harmful_refusal_rate": 0.5, "benign_refusal_rate": 0.05}},
                                   "elo": {"base": 950.0, "rl": 1050.0}})
    assert lines == ["harmful requests refused: base 10% -> rl 50%",
                     "benign requests refused (over-refusal): base 0% -> rl 5%",
                     "harmlessness Elo (judge): base 950, rl 1050"]


def test_check_type():
    ok, value = recipes.check_type(3, float)
    assert ok and value == 3.0 and isinstance(value, float)
    assert not recipes.check_type(True, int)[0]
    assert recipes.check_type(None, int | None) == (True, None)
    assert not recipes.check_type(["a", 1], list[str])[0]
    assert recipes.check_type("x", str | None) == (True, "x")


def test_real_stage_wiring_matches_the_stage_configs():
    """Every wired field exists in the real stage's config (stages not merged yet are skipped)."""
    import importlib.util

    for spec in recipes.STAGES:
        if importlib.util.find_spec(spec.module) is None:
            continue
        config_class, run_fn = spec.load()
        names = {f.name for f in dataclasses.fields(config_class)}
        assert set(spec.wiring) <= names, (spec.name, set(spec.wiring) - names)
        assert "out" in names and callable(run_fn)


def test_launch_section(tmp_path, prompts):
    path = write_recipe(tmp_path, "launch:\n  command: accelerate launch --config_file 'my conf.yaml'\n"
                                  "  stages: [sft, pm]\n", prompts)
    recipe = load(path)
    run_dir = tmp_path / "runs" / "t"
    assert recipes.launch_command(recipe, "sft") == [
        "accelerate", "launch", "--config_file", "my conf.yaml", "-m", "cai", "run", str(run_dir / "recipe.yaml"),
        "--only", "sft", "--runs-dir", str(tmp_path / "runs"), "--name", "t"]
    assert yaml.safe_load(recipes.write_resolved(recipe).read_text())["launch"]["stages"] == ["sft", "pm"]
    path = write_recipe(tmp_path, "launch:\n  comand: x\n  stages: [sfx]\n", prompts)
    with pytest.raises(RecipeError) as error:
        load(path)
    assert "unknown key `comand` in launch -- did you mean `command`" in str(error.value)
    assert "unknown stage `sfx` in launch.stages" in str(error.value)


@pytest.mark.parametrize("name", ["smoke", "demo", "demo-dpo", "qlora-1gpu", "multi-gpu"])
def test_bundled_recipes_load(name, tmp_path):
    path = Path(__file__).resolve().parent.parent / "recipes" / f"{name}.yaml"
    recipe = recipes.load(path, runs_dir=tmp_path)
    assert recipe.name == name and recipe.stages[-1].spec.name == "eval"
    assert [s.spec.name for s in recipe.stages][:3] == ["critique", "sft", "feedback"]


def test_the_dpo_demo_shares_the_demo_up_to_feedback(tmp_path):
    """demo-dpo.yaml says it has the demo's stages and sizes up to feedback, so the two reports compare
    PM + RL against DPO; it had drifted (48 unprimed revisions, helpful fraction 0.5)."""
    root = Path(__file__).resolve().parent.parent / "recipes"
    demo, dpo = (recipes.load(root / f"{name}.yaml", runs_dir=tmp_path) for name in ("demo", "demo-dpo"))
    for stage in ("critique", "sft", "feedback"):
        # Upstream outputs and `out` lie in each run's own directory: compare the rest.
        first, second = (json.loads(json.dumps(dataclasses.asdict(r.stage(stage).config)).replace(str(r.run_dir), "RUN"))
                         for r in (demo, dpo))
        assert first == second, {key: (first[key], second[key]) for key in first if first[key] != second[key]}


def test_every_bundled_recipe_is_named_in_the_readme_table_and_in_cai_run_help():
    """A newcomer picks a recipe from README's table or `cai run --help`: demo-dpo.yaml was in neither."""
    import typer

    from cai.cli import app

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    command = typer.main.get_command(app).commands["run"]
    help_text = next(p.help for p in command.params if p.name == "recipe")
    for recipe in sorted((root / "recipes").glob("*.yaml")):
        assert f"| `recipes/{recipe.name}` |" in readme, recipe.name
        assert f" {recipe.stem}," in help_text or f" {recipe.stem})" in help_text, recipe.stem


def test_a_bundled_recipe_is_found_outside_the_checkout(tmp_path, monkeypatch):
    """An installed cai has its recipes inside the package: `cai run recipes/smoke.yaml` from any directory
    (as the README writes it), or the bare name, loads the bundled copy."""
    monkeypatch.chdir(tmp_path)
    for reference in ("recipes/smoke.yaml", "smoke"):
        assert recipes.load(reference, runs_dir=tmp_path / "runs").name == "smoke"
    with pytest.raises(RecipeError, match="no such recipe file"):
        recipes.load("recipes/nope.yaml", runs_dir=tmp_path / "runs")


def test_a_misspelt_recipe_suggests_the_nearest_bundled_one(tmp_path, monkeypatch):
    """`cai run recipes/dem.yaml` suggested recipes/smoke.yaml whatever the name."""
    monkeypatch.chdir(tmp_path)
    for reference, suggestion in (("recipes/dem.yaml", "recipes/demo.yaml"), ("qlora", "recipes/qlora-1gpu.yaml"),
                                  ("recipes/demo-dp.yaml", "recipes/demo-dpo.yaml")):
        with pytest.raises(RecipeError, match=rf"^{reference}: no such recipe file -- did you mean {suggestion}\?$"):
            recipes.load(reference, runs_dir=tmp_path / "runs")
    with pytest.raises(RecipeError, match=r"no such recipe file -- see recipes/ for examples"):
        recipes.load("experiments/zzzz.yaml", runs_dir=tmp_path / "runs")


SMOKE = Path(__file__).resolve().parent.parent / "recipes" / "smoke.yaml"


def test_the_recipe_constitution_reaches_rl_and_exponent_floats_are_numbers(tmp_path):
    recipe = recipes.load(SMOKE, ["constitution=medical", "rl.lr=5e-5"], runs_dir=tmp_path)
    assert recipe.stage("rl").config.constitution == recipe.stage("critique").config.constitution
    assert recipe.stage("rl").config.constitution == "medical"
    assert recipe.stage("rl").config.lr == 5e-5  # YAML 1.1 reads 5e-5 as a string


def test_one_value_for_a_list_option_is_a_list_of_one_as_on_the_command_line(tmp_path):
    recipe = recipes.load(SMOKE, ["rl.reward=pm:2"], runs_dir=tmp_path)
    assert recipe.stage("rl").config.reward == ["pm:2"]


def test_a_resolved_recipe_run_under_another_name_wires_its_own_outputs_and_takes_top_level_sets(tmp_path, prompts):
    path = write_recipe(tmp_path, "", prompts)
    run(path)
    resolved = tmp_path / "runs" / "t" / "recipe.yaml"
    again = recipes.load(resolved, ["seed=7", "model=other-model"], name="t2", runs_dir=tmp_path / "runs",
                         registry=REGISTRY)
    assert "/runs/t2/" in again.stage("sft").config.data  # not the first run's records
    assert again.stage("critique").config.seed == 7
    assert again.stage("sft").config.model == "other-model"
    same = recipes.load(resolved, [], runs_dir=tmp_path / "runs", registry=REGISTRY)
    assert [s.config for s in same.stages] == [s.config for s in load(path).stages]


def test_data_files_given_as_lists_or_null(tmp_path, prompts):
    path = write_recipe(tmp_path, "", prompts)
    assert load(path, ["data.helpful=null"]).stage("rl").config.prompts == [str(prompts.resolve())]
    with pytest.raises(RecipeError, match=r"`data.red_team` feeds `critique.prompts`, which takes one file"):
        recipes.load(SMOKE, ["data.red_team=[data/red_team_prompts.jsonl, data/helpful_prompts.jsonl]"],
                     runs_dir=tmp_path)
    recipe = recipes.load(SMOKE, ["data.red_team=[data/red_team_prompts.jsonl, data/eval_harmful.jsonl]",
                                  "critique.prompts=data/red_team_prompts.jsonl",
                                  "feedback.prompts=data/red_team_prompts.jsonl"], runs_dir=tmp_path)
    assert [Path(p).name for p in recipe.stage("rl").config.prompts] == [
        "red_team_prompts.jsonl", "eval_harmful.jsonl", "helpful_prompts.jsonl"]  # flattened, not nested
    with pytest.raises(RecipeError, match="no such file 'nowhere.jsonl'"):  # a list option's files are checked too
        recipes.load(SMOKE, ["rl.prompts=[data/red_team_prompts.jsonl, nowhere.jsonl]"], runs_dir=tmp_path)


def test_a_data_file_in_the_wrong_format_fails_at_load_not_when_its_stage_runs(tmp_path):
    with pytest.raises(RecipeError, match=r"data.human_prefs: .*red_team_prompts.jsonl:1: a preference needs"):
        recipes.load(SMOKE, ["data.human_prefs=data/red_team_prompts.jsonl"], runs_dir=tmp_path)
    wrong = tmp_path / "texts.jsonl"  # (an hh-rlhf file is a prompt set: the conversation before the answer)
    wrong.write_text('{"text": "How do I pick a lock?"}\n')
    with pytest.raises(RecipeError) as error:
        recipes.load(SMOKE, [f"data.red_team={wrong}"], runs_dir=tmp_path)
    assert "no prompt found" in str(error.value) and "rl_prompts" not in str(error.value)  # named once, as given


def test_a_non_scalar_key_is_a_problem_with_its_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nsft:\n  [a, b]: 1\n")
    with pytest.raises(RecipeError, match=r"r.yaml:3: a key must be a plain name"):
        recipes.load(recipe, runs_dir=tmp_path)


def test_a_choice_key_names_the_choices_as_the_command_line_does(tmp_path):
    with pytest.raises(RecipeError, match=r"^--set rl.algo=ppo: `rl.algo` must be one of grpo, rloo, got 'ppo'"):
        recipes.load(SMOKE, ["rl.algo=ppo"], runs_dir=tmp_path)


def test_a_config_error_finds_the_key_whose_flag_is_spelt_differently(tmp_path):
    """eval's `models` key is the command line's repeated --model: its errors say --model, and still point
    at the key that set it."""
    option = "eval.models=[a=embedded:tiny-random, a=embedded:tiny-random]"
    with pytest.raises(RecipeError, match=rf"^--set {re.escape(option)}: eval: model label 'a' is used twice in --model"):
        recipes.load(SMOKE, [option], runs_dir=tmp_path)


@pytest.mark.parametrize("old, new", [("feedback.policy", "model"), ("rl.policy", "model"),
                                      ("rl.checkpoint_every", "save_steps"),
                                      ("feedback.samples_temperature", "temperature"),
                                      ("sft.batch_size", "per_device_train_batch_size"),
                                      ("dpo.loss", "loss_type")])
def test_a_renamed_key_fails_naming_its_new_name(tmp_path, old, new):
    with pytest.raises(RecipeError, match=rf"^--set {re.escape(old)}=x: `{re.escape(old)}` is renamed to `{new}`$"):
        recipes.load(SMOKE, [f"{old}=x"], runs_dir=tmp_path)


def test_summary_of_a_maths_eval_gives_pass_at_k_and_the_ratio():
    lines = recipes.summary_lines({"models": {
        "base": {"harmful_refusal_rate": None, "verifiable": {"pass@1": 0.2, "pass@k": 0.5, "all@k": 0.05, "k": 4, "n": 8}},
        "rl": {"harmful_refusal_rate": None, "verifiable": {"pass@1": 0.35, "pass@k": 0.6, "all@k": 0.1, "k": 4, "n": 8}}}})
    assert lines == ["verifiable problems solved, greedy pass@1: base 20% -> rl 35% (1.75x)",
                     "pass@4 (from 8 samples): base 50% -> rl 60%; all@4: base 5% -> rl 10%"]


def test_a_second_run_of_the_same_run_directory_stops_before_any_stage(tmp_path, prompts):
    """Two `cai run r.yaml --name X` at once both ran critique, then both failed at sft on duplicate ids."""
    import subprocess
    import sys

    from cai.manifest import OutputBusy

    path = write_recipe(tmp_path, "", prompts)
    run_dir = tmp_path / "runs" / "t"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from cai.manifest import lock; "
                               "lock(sys.argv[1]); print('locked', flush=True); time.sleep(600)", str(run_dir)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputBusy, match=f"another cai \\(pid {holder.pid}\\) is writing .*choose another --name"):
            run(path)
        assert CALLS == {} and not (run_dir / "1-critique").exists()
    finally:
        holder.kill()
        holder.wait()
    assert not any(o.skipped for o in run(path).outcomes)  # the killed holder leaves nothing that blocks
