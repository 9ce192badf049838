"""Stage 4 (cai/stages/rl.py): config checks, KL never inherited, learning, resume/skip, the CLI."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cai.cli import app
from cai.errors import ConfigError, RecordsError
from cai.records import write_jsonl
from cai.rewards import CombinedReward
from cai.stages import rl
from cai.stages.base import NullReporter, StageContext
from cai.stages.rl import RLConfig

runner = CliRunner()


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    """A few helpful-style prompts and a few maths prompts with answers, as two files to mix."""
    root = tmp_path_factory.mktemp("rl-prompts")
    helpful = root / "helpful.jsonl"
    write_jsonl(helpful, [{"id": f"h{i}", "prompt": f"Tell me one fact about the number {i}."} for i in range(6)])
    maths = root / "maths.jsonl"
    write_jsonl(maths, [{"id": f"m{i}", "prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(6)])
    return helpful, maths


def metrics_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- config


def test_config_rejects_what_cannot_work():
    defaults = RLConfig(pm="some/pm")
    assert defaults.beta == 0.05 and defaults.reward == ["pm:1"] and defaults.algo == "grpo"
    cases = [dict(beta=-0.1), dict(algo="ppo"), dict(reward=["pm:1"]),  # pm reward without --pm
             dict(pm="x", reward=["math:1"]), dict(reward=["math:1", "math:2"]), dict(num_generations=1),
             dict(quantize="4bit", lora_r=0, reward=["math:1"]), dict(reward=["bogus:1"]),
             dict(temperature=0.0, reward=["math:1"])]
    for kwargs in cases:
        with pytest.raises(ConfigError):
            RLConfig(**kwargs)
    assert RLConfig(reward=["math:1", "code:0.5"]).weights == {"math": 1.0, "code": 0.5}
    assert RLConfig(pm="none", reward=["math:1"]).pm is None  # as --quantize none; was "--pm none is given"
    assert RLConfig(pm="NONE", reward=["math:1"]).pm is None  # the recipe check reads any case as none too


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_beta_comes_from_cai_never_from_trl_defaults(algo, tmp_path):
    from trl import GRPOConfig

    from cai.models import precision_for

    assert GRPOConfig.__dataclass_fields__["beta"].default == 0.0  # the trap: trl's GRPO default is no KL
    args = rl.trainer_args(RLConfig(algo=algo, reward=["math:1"]), tmp_path, "cpu", precision_for("cpu"))
    assert args.beta == 0.05
    assert not args.bf16 and not args.gradient_checkpointing  # precision chosen for the device
    assert args.per_device_train_batch_size == args.generation_batch_size == 2 * 4
    asked = rl.trainer_args(RLConfig(algo=algo, beta=0.0, reward=["math:1"]), tmp_path, "cpu", precision_for("cpu"))
    assert asked.beta == 0.0


def test_fewer_prompts_than_a_step_takes_is_an_error_not_zero_steps(tiny_model_dir, prompt_files, tmp_path):
    cfg = RLConfig(prompts=[str(prompt_files[0])], out=str(tmp_path / "rl"), model=tiny_model_dir,
                   reward=["math:1"], limit=1, prompts_per_step=2)
    with pytest.raises(ConfigError, match="1 prompt.* --prompts-per-step 2"):
        rl.run(cfg, StageContext(device="cpu"))


def test_verifiable_rewards_on_prompts_none_of_which_can_score_are_an_error(tiny_model_dir, prompt_files, tmp_path):
    """Every answer would score 0: the run trained on zeros for its steps and reported success."""
    cfg = RLConfig(prompts=[str(prompt_files[0])], out=str(tmp_path / "rl"), model=tiny_model_dir,
                   reward=["math:1"], limit=4, prompts_per_step=2, judge="none")
    with pytest.raises(ConfigError, match="none of the 4 prompts has an `answer` or `tests`"):
        rl.run(cfg, StageContext(device="cpu"))


def test_prompt_files_are_mixed_into_conversational_rows(prompt_files):
    rows = rl.load_prompt_rows([str(p) for p in prompt_files])
    assert len(rows) == 12
    assert rows[0]["prompt"] == [{"role": "user", "content": "Tell me one fact about the number 0."}]
    assert rows[0]["answer"] is None and rows[6]["answer"] == "0" and rows[6]["tests"] is None


def test_prompt_rows_check_answers_when_read_and_join_listed_tests(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps({"id": "mbpp-1", "prompt": "Write f.", "tests": ["assert f(1) == 2", "assert f(2) == 3"]})
                    + "\n" + json.dumps({"id": "m-1", "prompt": "What is 2+2?", "answer": "4"}) + "\n")
    rows = rl.load_prompt_rows([str(path)])
    assert rows[0]["tests"] == "assert f(1) == 2\nassert f(2) == 3"  # str(list) would assert nothing
    path.write_text(path.read_text() + json.dumps({"id": "m-2", "prompt": "How far?", "answer": "5 km"}) + "\n")
    with pytest.raises(RecordsError, match=r"tasks.jsonl: record 'm-2': answer '5 km' is not one number"):
        rl.load_prompt_rows([str(path)])


# ----------------------------------------------------------------------------- training


def target_share(prompts, completions, completion_ids=None, **kwargs):
    """Synthetic reward: the share of a completion's tokens whose id is a multiple of 4 (about 1/4 at start)."""
    return [sum(1 for t in ids if t % 4 == 0) / max(1, len(ids)) for ids in completion_ids]


def test_grpo_steps_raise_the_mean_reward(tiny_model_dir, prompt_files, tmp_path, monkeypatch):
    monkeypatch.setattr(rl, "build_reward", lambda cfg, tokenizer, device, observers=():
                        (CombinedReward([("target", target_share, 1.0)], observers), {}))
    cfg = RLConfig(prompts=[str(prompt_files[0])], out=str(tmp_path / "rl"), model=tiny_model_dir,
                   reward=["format:1"], max_steps=8, lr=5e-2, lora_r=0, num_generations=8, max_new_tokens=10,
                   judge="none", save_steps=100)
    result = rl.run(cfg, StageContext(device="cpu"))
    history = metrics_of(tmp_path / "rl")
    assert [r["step"] for r in history] == list(range(1, 9))
    first = sum(r["reward"] for r in history[:3]) / 3
    last = sum(r["reward"] for r in history[-3:]) / 3
    assert last > first + 0.15, [round(r["reward"], 3) for r in history]
    assert history[-1]["kl"] > 0  # the default beta keeps a KL term against the start policy
    assert 0 < history[-1]["generate_s"] <= history[-1]["step_s"]
    assert result.metrics["reward_last"] == pytest.approx(history[-1]["reward"], abs=1e-4)


def test_lora_rl_on_a_cpu_with_native_bf16_trains_fp32_adapters_over_a_bf16_base(
        tiny_model_dir, prompt_files, tmp_path, monkeypatch, native_bf16):
    """Under CPU bf16 autocast the frozen base is loaded in bf16 (autocast would re-cast fp32 frozen
    weights at every forward, each decode step included); the adapters it trains stay fp32 and move."""
    import torch

    monkeypatch.setattr(rl, "build_reward", lambda cfg, tokenizer, device, observers=():
                        (CombinedReward([("target", target_share, 1.0)], observers), {}))
    seen = {}
    trainer_class = rl._trainer_class("grpo")

    class Spy(trainer_class):
        def train(self, *args, **kwargs):
            lora = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
            result = super().train(*args, **kwargs)
            seen["lora"] = {n: (p.dtype, not torch.equal(p.detach(), lora[n]))
                            for n, p in self.model.named_parameters() if n in lora}
            seen["frozen"] = {p.dtype for p in self.model.parameters() if not p.requires_grad}
            return result

    monkeypatch.setattr(rl, "_trainer_class", lambda algo: Spy)
    cfg = RLConfig(prompts=[str(prompt_files[0])], out=str(tmp_path / "rl"), model=tiny_model_dir,
                   reward=["format:1"], max_steps=2, lr=1e-2, lora_r=4, num_generations=4, max_new_tokens=6,
                   judge="none", save_steps=100)
    result = rl.run(cfg, StageContext(device="cpu"))
    assert seen["frozen"] == {torch.bfloat16}
    assert seen["lora"] and {dtype for dtype, _ in seen["lora"].values()} == {torch.float32}
    assert any(moved for _, moved in seen["lora"].values())
    assert all(r["reward"] == r["reward"] for r in metrics_of(tmp_path / "rl"))  # no NaN
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(result.outputs["model"])


class Killed(Exception):
    """Stands for the process being killed mid-run."""


def test_interrupted_run_resumes_from_its_checkpoint_and_a_finished_run_is_skipped(
        tiny_model_dir, prompt_files, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "rl"
    cfg = RLConfig(prompts=[str(p) for p in prompt_files], out=str(out), model=tiny_model_dir, reward=["math:1"],
                   max_steps=4, max_new_tokens=6, judge="none", save_steps=2, lora_r=4)
    original_log = rl.Monitor.log
    logged_steps, kill = [], [True]

    def interrupted_log(self, step, logs):
        original_log(self, step, logs)
        if "reward" not in logs:  # trl's end-of-training summary line
            return
        logged_steps.append(step)
        if step == 3 and kill.pop():
            raise Killed

    monkeypatch.setattr(rl.Monitor, "log", interrupted_log)
    with pytest.raises(Killed):
        rl.run(cfg, StageContext(device="cpu"))
    assert json.loads((out / "manifest.json").read_text())["status"] == "partial"
    assert (out / "checkpoints" / "checkpoint-2").is_dir()

    logged_steps.clear()
    kill.append(False)
    reporter = NullReporter()
    result = rl.run(cfg, StageContext(reporter=reporter, device="cpu"))
    assert any("resuming from" in m and "checkpoint-2" in m for m in reporter.messages)
    assert logged_steps == [3, 4]  # steps 1-2 were not trained again
    assert [r["step"] for r in metrics_of(out)] == [1, 2, 3, 4]  # the aborted step 3 record was replaced
    assert not (out / "checkpoints").exists()
    AutoModelForCausalLM.from_pretrained(result.outputs["model"])  # standalone: no adapter step
    assert (Path(result.outputs["model"]) / "adapter").is_dir()

    monkeypatch.setattr(rl, "_trainer_class", lambda algo: pytest.fail("a finished run must not train again"))
    again = rl.run(cfg, StageContext(device="cpu"))
    assert again.skipped


def test_ctrl_c_while_a_step_logs_saves_the_next_one_and_the_resume_trains_only_the_rest(
        tiny_model_dir, prompt_files, tmp_path, monkeypatch):
    import os
    import signal

    out = tmp_path / "rl"
    cfg = RLConfig(prompts=[str(p) for p in prompt_files], out=str(out), model=tiny_model_dir, reward=["math:1"],
                   max_steps=4, max_new_tokens=6, judge="none", save_steps=100, lora_r=4)
    original_log = rl.Monitor.log
    logged_steps, interrupt = [], [True]

    def interrupted_log(self, step, logs):
        original_log(self, step, logs)
        if "reward" in logs:
            logged_steps.append(step)
            if step == 2 and interrupt.pop():  # after step 2's end: the trainer stops after step 3
                os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(rl.Monitor, "log", interrupted_log)
    with pytest.raises(KeyboardInterrupt):
        rl.run(cfg, StageContext(device="cpu"))
    assert logged_steps == [1, 2, 3]
    assert [p.name for p in (out / "checkpoints").glob("checkpoint-*")] == ["checkpoint-3"]
    assert json.loads((out / "manifest.json").read_text())["status"] == "partial"

    logged_steps.clear()
    interrupt.append(False)
    result = rl.run(cfg, StageContext(device="cpu"))
    assert logged_steps == [4] and [r["step"] for r in metrics_of(out)] == [1, 2, 3, 4]
    assert result.counts["steps"] == 4


def test_cli_runs_rloo_on_verifiable_rewards_without_a_pm(tiny_model_dir, prompt_files, tmp_path):
    out = tmp_path / "rl"
    result = runner.invoke(app, [
        "rl", "--model", tiny_model_dir, "--prompts", str(prompt_files[1]), "--prompts", str(prompt_files[0]),
        "--out", str(out), "--algo", "rloo", "--reward", "math:1", "--reward", "format:0.5", "--beta", "0",
        "--max-steps", "2", "--max-new-tokens", "6", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["outputs"]["model"] == str(out / "model")
    assert "KL penalty off" in result.stderr
    history = metrics_of(out)
    assert len(history) == 2 and all(r["judge_score"] is not None for r in history)  # held-back judge ran
    assert all("boilerplate_share" in r and r["generate_s"] > 0 for r in history)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["config"]["algo"] == "rloo"


def test_cli_refuses_a_pm_reward_without_a_pm(tiny_model_dir, prompt_files, tmp_path):
    result = runner.invoke(app, ["rl", "--model", tiny_model_dir, "--prompts", str(prompt_files[0]),
                                 "--out", str(tmp_path / "rl")])
    assert isinstance(result.exception, ConfigError) and "--pm" in str(result.exception)


def test_a_metrics_record_reaches_the_file_whole_or_not_at_all(tmp_path, monkeypatch):
    """A kill while a step's record is written must not leave a torn line: the resume reads the file strictly."""
    import cai.records

    path = tmp_path / "metrics.jsonl"
    monitor = rl.Monitor(path)
    monitor.log(1, {"reward": 0.5})

    def killed_while_writing(*args):
        raise Killed

    monkeypatch.setattr(cai.records.os, "replace", killed_while_writing)
    with pytest.raises(Killed):
        monitor.log(2, {"reward": 0.7})
    monkeypatch.undo()
    assert [r["step"] for r in rl.Monitor(path).history] == [1]


def test_a_resumed_run_draws_each_pass_over_the_prompts_in_the_same_order():
    """trl's sampler drew pass k's order from where pass k-1 left its generator: a run resumed in its
    second pass restarted at the seed and trained on other prompts than the run it continued."""
    from trl.trainer.utils import RepeatSampler

    def orders(sampler, epochs):
        out = []
        for epoch in epochs:
            sampler.set_epoch(epoch)
            out.append(list(sampler))
        return out

    uninterrupted = orders(rl.epoch_seeded(RepeatSampler(list(range(12)), mini_repeat_count=2, seed=7)), [0, 1, 2])
    resumed = orders(rl.epoch_seeded(RepeatSampler(list(range(12)), mini_repeat_count=2, seed=7)), [1, 2])
    assert resumed == uninterrupted[1:]
    assert uninterrupted[0] != uninterrupted[1]  # still shuffled afresh each pass


def test_cli_refuses_a_code_reward_without_a_sandbox_before_loading_a_model(prompt_files, tmp_path, monkeypatch):
    from cai.errors import MissingDependency
    from cai.rewards import sandbox

    monkeypatch.setattr(sandbox, "_find_bwrap", lambda: None)
    monkeypatch.setattr(rl, "build_reward", lambda *a, **k: pytest.fail("a reward was built"))
    sandbox.sandbox_problem.cache_clear()
    try:
        args = ["rl", "--model", "no/such-model", "--prompts", str(prompt_files[1]), "--out", str(tmp_path / "rl"),
                "--reward", "code:1", "--reward", "math:1"]
        result = runner.invoke(app, args)
        assert isinstance(result.exception, MissingDependency)
        assert "apt-get install bubblewrap" in str(result.exception)
        assert not (tmp_path / "rl" / "manifest.json").exists()
        unsafe = runner.invoke(app, [*args, "--unsafe-run-code"])  # goes on, warns, then fails on the model
        assert "UNSANDBOXED" in unsafe.stderr and not isinstance(unsafe.exception, MissingDependency)
    finally:
        sandbox.sandbox_problem.cache_clear()
