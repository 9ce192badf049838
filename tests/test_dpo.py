"""cai dpo: the soft-label loss against trl's, the shared human/AI mix, training, resume, standalone output."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from trl import DPOTrainer
from typer.testing import CliRunner

from cai import records
from cai.cli import app
from cai.errors import ConfigError
from cai.stages import dpo, pm
from cai.stages.base import NullReporter, StageContext

MARKER = "Sure! The capital of France is Paris."
REFUSAL = "I can't help with that, because it could hurt someone."
PROMPTS = ["Which city is the capital of France?", "Tell me the capital of France.", "What is France's capital?",
           "Name the capital city of France.", "France: what is its capital?", "Where is the French capital?"]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The tiny model gains nothing from threads, and on a shared CPU two spinning OpenMP threads per
    process made a training step 40x slower (1.6 s against 0.04 s, measured on this machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def pref_files(tmp_path):
    """A feedback-stage-style AI file (soft labels) and an hh-rlhf human file; chosen answers carry MARKER."""
    ai = [{"id": f"ai-{i}", "prompt": p, "chosen": MARKER, "rejected": REFUSAL, "p_chosen": 0.9,
           "source": "ai-harmless"} for i, p in enumerate(PROMPTS)]
    human = [{"chosen": f"\n\nHuman: {p}\n\nAssistant: {MARKER}", "rejected": f"\n\nHuman: {p}\n\nAssistant: {REFUSAL}"}
             for p in PROMPTS[:4]]
    ai_path, human_path = tmp_path / "ai.jsonl", tmp_path / "human.jsonl"
    records.write_jsonl(ai_path, ai)
    records.write_jsonl(human_path, human)
    return ai_path, human_path


def tiny_trainer(tiny_model_dir, tmp_path, *, loss="sigmoid", pairs=4, p_chosen=1.0):
    """A soft-label DPO trainer on the tiny model, LoRA r=4, and its first batch (on CPU)."""
    from cai.models import load_causal_lm

    cfg = dpo.DPOConfig(model=tiny_model_dir, ai="unused", out=str(tmp_path), loss_type=loss, soft_labels=True,
                        lora_r=4, max_length=64, per_device_train_batch_size=pairs, max_steps=1)
    model, tokenizer = load_causal_lm(tiny_model_dir, device="cpu")
    examples = [dpo.to_trl_example({"prompt": p, "chosen": MARKER, "rejected": REFUSAL, "p_chosen": p_chosen})
                for p in PROMPTS[:pairs]]
    trainer = dpo.build_trainer(cfg, model, tokenizer, examples, tmp_path / "checkpoints", "cpu")
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    return trainer, batch


def margins(model_dir, prompts):
    """Sum over prompts of log p(MARKER) - log p(REFUSAL) under a model directory."""
    from cai.engine import Engine

    engine = Engine.from_reference(model_dir, device="cpu")
    contexts = [engine.render([{"role": "user", "content": p}]) for p in prompts]
    chosen = engine.score(contexts, [MARKER] * len(prompts))
    rejected = engine.score(contexts, [REFUSAL] * len(prompts))
    return sum(c.logprob - r.logprob for c, r in zip(chosen, rejected, strict=True))


# ----------------------------------------------------------------------------- pure losses


def test_soft_loss_is_the_sigmoid_loss_at_p_1_and_symmetric_at_half():
    torch.manual_seed(0)
    chosen, rejected = torch.randn(8) * 3, torch.randn(8) * 3  # (B,) log-ratios
    beta = 0.1
    ones = torch.ones(8)
    assert torch.allclose(dpo.soft_dpo_loss(chosen, rejected, ones, beta), -F.logsigmoid(beta * (chosen - rejected)))
    half = torch.full((8,), 0.5)
    # p = 0.5 prefers neither answer: swapping chosen and rejected leaves the loss unchanged ...
    assert torch.allclose(dpo.soft_dpo_loss(chosen, rejected, half, beta), dpo.soft_dpo_loss(rejected, chosen, half, beta))
    # ... and its gradient pulls the margin back toward 0 (the reference's own preference), never past it.
    c = chosen.clone().requires_grad_()
    dpo.soft_dpo_loss(c, rejected, half, beta).sum().backward()
    assert torch.equal(torch.sign(c.grad), torch.sign(chosen - rejected))
    # Label smoothing with epsilon = 1 - p, as conservative DPO writes it.
    p = torch.rand(8)
    h = beta * (chosen - rejected)
    smoothed = -(1 - (1 - p)) * F.logsigmoid(h) - (1 - p) * F.logsigmoid(-h)
    assert torch.allclose(dpo.soft_dpo_loss(chosen, rejected, p, beta), smoothed)


def test_half_label_gives_zero_gradient_on_the_policy_logits_at_the_reference():
    """Policy = reference (the start of training): p = 0.5 gives no gradient on the logits, p = 0.8 does."""
    torch.manual_seed(0)
    labels = torch.randint(0, 11, (4, 6))  # (2B, T): chosen rows, then rejected rows

    def logits_grad(p):
        logits = torch.randn(4, 6, 11, generator=torch.Generator().manual_seed(1)).requires_grad_()  # (2B, T, V)
        logps = logits.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1).sum(-1)  # (2B,)
        ref = logps.detach()  # the reference is the starting policy
        ratios = logps - ref
        chosen, rejected = ratios.chunk(2)
        dpo.soft_dpo_loss(chosen, rejected, torch.full((2,), p), 0.1).sum().backward()
        return logits.grad

    assert logits_grad(0.5).abs().max() == 0
    assert logits_grad(0.8).abs().max() > 1e-4


def test_soft_ipo_loss_at_p_1_is_trls_ipo_and_targets_zero_at_half():
    torch.manual_seed(0)
    chosen, rejected, beta = torch.randn(5), torch.randn(5), 0.1
    assert torch.allclose(dpo.soft_ipo_loss(chosen, rejected, torch.ones(5), beta),
                          (chosen - rejected - 1 / (2 * beta)) ** 2)
    assert torch.allclose(dpo.soft_ipo_loss(chosen, rejected, torch.full((5,), 0.5), beta), (chosen - rejected) ** 2)


def test_robust_label_noise_is_the_mean_flip_probability_below_one_half():
    assert dpo.robust_label_noise([1.0, 0.8, 0.9]) == pytest.approx(0.1)
    assert dpo.robust_label_noise([0.0, 0.2]) == dpo.MAX_ROBUST_SMOOTHING
    assert dpo.robust_label_noise([]) == 0.0


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("kwargs, words", [
    ({"loss_type": "robust", "soft_labels": True}, "--loss-type sigmoid"),
    ({"quantize": "4bit", "lora_r": 0}, "QLoRA"),
    ({"human_fraction": 1.5}, "[0, 1]"),
    ({"loss_type": "hinge"}, "sigmoid, ipo, robust"),
    ({"beta": 0.0}, "beta"),
])
def test_config_rejects_combinations_that_cannot_work(kwargs, words):
    with pytest.raises(ConfigError) as error:
        dpo.DPOConfig(ai="a.jsonl", out="o", **kwargs)
    assert words in str(error.value)


def test_learning_rate_default_depends_on_lora():
    assert dpo.DPOConfig(lora_r=16).learning_rate == dpo.LORA_LR
    assert dpo.DPOConfig(lora_r=0).learning_rate == dpo.FULL_LR
    assert dpo.DPOConfig(lora_r=0, lr=3e-4).learning_rate == 3e-4


def test_a_pair_labelled_against_its_chosen_answer_trains_toward_the_other():
    example = dpo.to_trl_example({"prompt": "q", "chosen": "Sure, here's how.", "rejected": "I can't help.",
                                  "p_chosen": 0.2})
    assert example["chosen"][0]["content"] == "I can't help." and example["p_chosen"] == pytest.approx(0.8)
    assert dpo.to_trl_example({"prompt": "q", "chosen": "a", "rejected": "b", "p_chosen": 0.7})["chosen"] == \
        [{"role": "assistant", "content": "a"}]

@pytest.mark.parametrize("soft_labels", [False, True])
def test_tied_pairs_train_only_under_soft_labels(tmp_path, soft_labels):
    """p_chosen 0.5 (two orders that cancelled out) has no winner: a hard label would invent one."""
    pairs = [{"id": f"ai-{i}", "prompt": p, "chosen": MARKER, "rejected": REFUSAL, "p_chosen": 0.9 if i else 0.5,
              "source": "ai-harmless"} for i, p in enumerate(PROMPTS)]
    records.write_jsonl(tmp_path / "ai.jsonl", pairs)
    cfg = dpo.DPOConfig(model="unused", ai=str(tmp_path / "ai.jsonl"), out=str(tmp_path / "out"),
                        soft_labels=soft_labels, eval_fraction=0.0)
    prepared = dpo.prepare_pairs(cfg)
    trained = {r["id"] for r in prepared.mix.records}
    assert ("ai-0" in trained) == soft_labels
    assert [(r["id"], r["reason"]) for r in prepared.dropped] == ([] if soft_labels else [("ai-0", "no-preference")])
    assert len(trained) == len(PROMPTS) - (not soft_labels)


def test_screen_pairs_drops_prompts_that_fill_max_length_and_counts_cut_answers(tiny_model_dir):
    from cai.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    pairs = [{"id": "ok", "prompt": "Hi", "chosen": MARKER, "rejected": REFUSAL, "p_chosen": 1.0},
             {"id": "long", "prompt": "word " * 200, "chosen": MARKER, "rejected": REFUSAL, "p_chosen": 1.0},
             {"id": "cut", "prompt": "Hi", "chosen": MARKER * 8, "rejected": REFUSAL, "p_chosen": 1.0}]
    kept, dropped, truncated = dpo.screen_pairs(pairs, tokenizer, max_length=64)
    assert [(r["id"], r["reason"]) for r in dropped] == [("long", "prompt-too-long")]
    assert len(kept) == 2 and truncated == 1
    assert kept[0]["prompt"] == [{"role": "user", "content": "Hi"}]
    assert kept[0]["chosen"] == [{"role": "assistant", "content": MARKER}]


# ----------------------------------------------------------------------------- against trl, on the tiny model


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_soft_loss_at_p_1_equals_trls_loss_on_the_same_batch(tiny_model_dir, tmp_path, loss):
    trainer, batch = tiny_trainer(tiny_model_dir, tmp_path, loss=loss)
    assert trainer.ref_model is None  # LoRA: the reference is the adapter-disabled model, no second copy
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy away from the reference, so the margin is not 0
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    assert torch.equal(batch["p_chosen"], torch.ones(4))
    ours = trainer._compute_loss(trainer.model, batch, False)
    trl_batch = {k: v for k, v in batch.items() if k != "p_chosen"}
    theirs = DPOTrainer._compute_loss(trainer, trainer.model, trl_batch, False)  # trl's own code path
    assert abs(ours.item() - theirs.item()) < 1e-5
    if loss == "sigmoid":
        assert abs(ours.item() - math.log(2)) > 1e-3  # the margin is not 0: the comparison means something


def test_half_label_gives_no_gradient_at_the_start_of_training(tiny_model_dir, tmp_path):
    trainer, batch = tiny_trainer(tiny_model_dir, tmp_path / "a", p_chosen=0.5)

    def grad_norm(b):
        trainer.model.zero_grad()
        trainer._compute_loss(trainer.model, b, False).backward()
        return sum(p.grad.abs().sum().item() for p in trainer.model.parameters() if p.grad is not None)

    assert grad_norm(batch) == 0.0
    assert grad_norm({**batch, "p_chosen": torch.full_like(batch["p_chosen"], 0.9)}) > 0.0


# ----------------------------------------------------------------------------- the stage


def test_cai_dpo_raises_the_margin_writes_a_standalone_model_and_skips_a_rerun(tiny_model_dir, pref_files, tmp_path,
                                                                                monkeypatch):
    ai_path, human_path = pref_files
    out = tmp_path / "model"
    calls = []
    shared_mix = records.mix_preferences

    def spy(ai, human, fraction, seed=0):
        calls.append(([r["id"] for r in ai], [r["id"] for r in human], fraction, seed))
        return shared_mix(ai, human, fraction, seed)

    monkeypatch.setattr(records, "mix_preferences", spy)
    before = margins(tiny_model_dir, PROMPTS)
    args = ["dpo", "--model", tiny_model_dir, "--ai", str(ai_path), "--human", str(human_path), "--out", str(out),
            "--soft-labels", "--lora-r", "8", "--lr", "1e-2", "--max-steps", "6", "--per-device-train-batch-size", "4",
            "--max-length", "64", "--save-steps", "3", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # The PM stage's preparation: its held-out split (10% of each side), then the shared mixing function
    # with the paper's fraction.
    expected = [[r["id"] for r in pm.split_heldout(records.read_preferences(path), 0.1, 0)[0]]
                for path in (ai_path, human_path)]
    assert calls == [(expected[0], expected[1], pm.PAPER_HUMAN_FRACTION, 0)]
    counts, metrics = report["counts"], report["metrics"]
    assert counts["steps"] == 6 and counts["human_used"] > 0 and counts["ai_heldout"] == 1
    assert metrics["heldout_accuracy_ai"] == 1.0  # the held-out pair's chosen answer now wins
    assert not (out / "checkpoints").exists()  # removed after the final save
    assert (out / "adapter" / "adapter_config.json").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["config"]["soft_labels"] is True
    model = AutoModelForCausalLM.from_pretrained(out)  # standalone: no adapter step
    assert not any("lora" in name for name, _ in model.named_parameters())
    after = margins(str(out), PROMPTS)
    assert after > before + 1.0

    def fail(*args, **kwargs):
        raise AssertionError("a finished stage must not train again")

    monkeypatch.setattr(dpo, "build_trainer", fail)
    monkeypatch.setattr("cai.models.load_causal_lm", fail)
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout.strip().splitlines()[-1])["skipped"] is True


class _InterruptingReporter(NullReporter):
    """Raises KeyboardInterrupt at the end of training step `at` (after earlier checkpoints were saved)."""

    def __init__(self, at: int | None):
        super().__init__()
        self.at, self.advanced = at, 0
        outer = self

        class _Task:
            def advance(self, items=1, tokens=0):
                outer.advanced += items
                if outer.at is not None and outer.advanced >= outer.at:
                    raise KeyboardInterrupt

            def close(self):
                pass

        self._task = _Task()

    def task(self, description, total, unit="items"):
        return self._task


def test_an_interrupted_run_resumes_from_its_last_checkpoint(tiny_model_dir, pref_files, tmp_path):
    ai_path, _ = pref_files
    cfg = dpo.DPOConfig(model=tiny_model_dir, ai=str(ai_path), out=str(tmp_path / "m"), lora_r=4, max_steps=4,
                        save_steps=2, per_device_train_batch_size=2, max_length=64, soft_labels=True)
    with pytest.raises(KeyboardInterrupt):
        dpo.run(cfg, StageContext(reporter=_InterruptingReporter(at=3), device="cpu"))
    assert (tmp_path / "m" / "checkpoints" / "checkpoint-2").is_dir()
    assert json.loads((tmp_path / "m" / "manifest.json").read_text())["status"] == "partial"

    reporter = _InterruptingReporter(at=None)
    result = dpo.run(cfg, StageContext(reporter=reporter, device="cpu"))
    assert result.counts["resumed_from_step"] == 2 and result.counts["steps"] == 4
    assert reporter.advanced == 4  # 2 restored from the checkpoint + 2 trained now
    assert any("resuming from" in m for m in reporter.messages)
    assert not (tmp_path / "m" / "checkpoints").exists()


def test_qlora_4bit_with_trls_robust_loss_saves_a_full_precision_standalone_model(tiny_model_dir, pref_files,
                                                                                      tmp_path):
    """QLoRA on CPU, and the hard-label path (trl's own loss): robust DPO with the label-noise rate taken
    from the AI records' p_chosen (0.9 each, so 0.1)."""
    ai_path, _ = pref_files
    out = tmp_path / "q"
    cfg = dpo.DPOConfig(model=tiny_model_dir, ai=str(ai_path), out=str(out), quantize="4bit", lora_r=4,
                        max_steps=1, per_device_train_batch_size=2, max_length=64, loss_type="robust")
    result = dpo.run(cfg, StageContext(device="cpu"))
    assert result.counts["steps"] == 1 and result.metrics["label_smoothing"] == pytest.approx(0.1)
    assert math.isfinite(result.metrics["loss"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.dtype == torch.float32 and (out / "adapter" / "adapter_model.safetensors").exists()


def test_heldout_accuracy_is_the_share_of_pairs_even_when_the_last_batch_is_short(tiny_model_dir, tmp_path):
    """trl logs the mean of per-batch means: 5 held-out pairs in batches of 4 and 1 would weigh the last
    pair as much as the other four together."""
    from torch.utils.data import DataLoader

    from cai.models import load_causal_lm

    cfg = dpo.DPOConfig(model=tiny_model_dir, ai="unused", out=str(tmp_path), lora_r=4, max_length=64,
                        per_device_train_batch_size=4, max_steps=1)
    model, tokenizer = load_causal_lm(tiny_model_dir, device="cpu")
    # Two pairs prefer MARKER, three REFUSAL: a model leaning either way gets some right and some wrong.
    pairs = [dpo.to_trl_example({"prompt": p, "chosen": MARKER if i < 2 else REFUSAL,
                                 "rejected": REFUSAL if i < 2 else MARKER, "p_chosen": 1.0})
             for i, p in enumerate(PROMPTS[:5])]
    trainer = dpo.build_trainer(cfg, model, tokenizer, pairs, tmp_path / "checkpoints", "cpu", heldout={"ai": pairs})
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    reported = dpo.evaluate_heldout(trainer)["ai"]["eval_rewards/accuracies"]
    data = trainer._remove_unused_columns(trainer.eval_dataset["ai"], description="evaluation")
    batch = trainer._prepare_inputs(next(iter(DataLoader(data, batch_size=5, collate_fn=trainer.data_collator))))
    trainer.model.eval()
    with torch.no_grad():
        trainer._compute_loss(trainer.model, batch, False)  # all five pairs in one batch
    truth = trainer._metrics["eval"]["rewards/accuracies"][-1]
    assert 0.0 < truth < 1.0
    assert reported == pytest.approx(truth)


def test_heldout_pairs_without_a_preference_are_left_out_of_the_accuracy(tiny_model_dir, tmp_path, monkeypatch):
    """A held-out pair labelled 0.5 has no winner: the PM leaves it out of its accuracy, and DPO's implicit
    reward accuracy (reported beside the PM's) must too, instead of counting it for `chosen`."""
    pairs = [{"id": f"ai-{i}", "prompt": p, "chosen": MARKER, "rejected": REFUSAL, "p_chosen": 0.5 if i % 2 else 0.9}
             for i, p in enumerate(PROMPTS)]
    records.write_jsonl(tmp_path / "ai.jsonl", pairs)
    cfg = dpo.DPOConfig(model=tiny_model_dir, ai=str(tmp_path / "ai.jsonl"), out=str(tmp_path / "out"),
                        soft_labels=True, eval_fraction=0.5, lora_r=4, max_length=64, max_steps=1)
    heldout_ids = {r["id"] for r in dpo.prepare_pairs(cfg).heldout_ai}
    assert any(int(i.split("-")[1]) % 2 for i in heldout_ids)  # a tie is among the held-out pairs
    seen = {}

    def spy(*args, heldout=None, **kwargs):
        seen.update(heldout)
        raise RuntimeError("stop before training")

    monkeypatch.setattr(dpo, "build_trainer", spy)
    with pytest.raises(RuntimeError, match="stop before training"):
        dpo.run(cfg, StageContext(device="cpu"))
    assert seen["ai"] and all(e["p_chosen"] != 0.5 for e in seen["ai"])
    assert len(seen["ai"]) == sum(1 for i in heldout_ids if not int(i.split("-")[1]) % 2)
