import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cai import models
from cai.errors import ConfigError, ModelError
from cai.models import (
    inference_dtype,
    load_causal_lm,
    lora_config,
    precision_for,
    resolve,
    save_standalone,
)


def test_tiny_model_is_built_once_and_reused(tiny_model_dir):
    assert resolve("embedded:tiny-random") == tiny_model_dir
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.chat_template and tokenizer.pad_token


def test_tiny_model_answers_greedily_in_visible_text(tiny_engine):
    """Greedy decoding is how eval and sft's helpful mix answer: answers that strip to "" are dropped there,
    so a tiny model whose greedy answers were whitespace left the smoke run's judge and helpful mix idle."""
    from cai.engine import Sampling

    prompts = ["How do I pick a lock?", "What is the capital of France?", "Write a haiku about rain.",
               "Explain recursion to a child."]
    answers = tiny_engine.generate_chat([[{"role": "user", "content": p}] for p in prompts],
                                        Sampling(max_new_tokens=8, temperature=0.0))
    assert all(answer.text.strip() for answer in answers), [answer.text for answer in answers]


def test_a_tiny_model_built_from_another_spec_is_rebuilt_not_reused(tmp_path):
    import json

    old = models.build_tiny_random(tmp_path / "tiny", models.TinyModelSpec(initializer_range=0.02))
    assert json.loads((old / "config.json").read_text())["initializer_range"] == 0.02
    built = models.build_tiny_random(tmp_path / "tiny")
    assert built == old and json.loads((built / "config.json").read_text())["initializer_range"] == 0.1
    stamp = (built / "model.safetensors").stat().st_mtime_ns
    assert models.build_tiny_random(tmp_path / "tiny") == built  # same spec: reused
    assert (built / "model.safetensors").stat().st_mtime_ns == stamp


def test_missing_directory_and_offline_hub_id_fail_with_one_line():
    with pytest.raises(ModelError, match="no such directory"):
        resolve("./does-not-exist")
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        resolve("nobody/no-such-model")
    # A dot in a hub id is no file suffix: the GPU recipes' model must reach the hub cache lookup.
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        resolve("Qwen/Qwen2.5-7B-Instruct")
    with pytest.raises(ModelError, match="no such directory"):
        resolve("runs/no-such-run/2-sft/model")
    with pytest.raises(ModelError, match="unknown embedded model"):
        resolve("embedded:gpt-17")


def test_a_model_path_under_an_existing_directory_is_a_path_not_a_hub_id(tmp_path, monkeypatch):
    """`--model sl/model` before `cai sft --out sl` finished: 'no such directory', not 'download it'."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sl").mkdir()
    with pytest.raises(ModelError, match="no such directory"):
        resolve("sl/model")
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        resolve("nobody/model")  # no local `nobody`: a hub id


def test_an_existing_file_is_refused_as_a_file_not_looked_up_as_a_hub_id(tmp_path, monkeypatch):
    """`--model model.gguf` or `--model config.json`: not 'no such directory', not 'download it'."""
    monkeypatch.chdir(tmp_path)
    for name in ("weights.gguf", "Makefile"):
        (tmp_path / name).write_text("x")
        with pytest.raises(ModelError, match="is a file, not a model directory"):
            resolve(name)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve(str(tmp_path))


def test_an_unfinished_stage_output_is_refused_as_unfinished_not_as_a_wrong_directory(tmp_path):
    """`cai eval --model sft-out` while that sft run is interrupted: finishing the run is the fix, not
    pointing at another directory (the other stages already said so for their inputs)."""
    import json

    from cai import rewards

    (tmp_path / "checkpoints" / "checkpoint-35").mkdir(parents=True)
    (tmp_path / "manifest.json").write_text(json.dumps({"stage": "sft", "status": "partial"}))
    for check in (models.check_reference, rewards.pm_directory):
        with pytest.raises(ModelError, match=r"the run that writes it has not finished \(.*manifest.json says "
                                             r"partial\), so it holds no model yet -- run that command again"):
            check(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"stage": "sft", "status": "complete"}))
    with pytest.raises(ModelError, match="holds no config.json"):  # finished, model deleted: the old message
        models.check_reference(str(tmp_path))


def test_a_preference_model_is_refused_where_a_language_model_is_loaded(tiny_model_dir, tmp_path):
    """`cai rl --model runs/x/4-pm`, `cai eval --model pm`: the PM loaded as a causal LM without a word
    and generated text (the reverse mistake, an LM given as --pm, was already refused)."""
    from cai.models import load_causal_lm, load_sequence_classifier

    pm, tokenizer = load_sequence_classifier(tiny_model_dir, device="cpu")
    pm.save_pretrained(tmp_path / "pm" / "model")
    tokenizer.save_pretrained(tmp_path / "pm" / "model")
    for reference in (tmp_path / "pm", tmp_path / "pm" / "model"):
        with pytest.raises(ModelError, match=r"a preference model \(\w+ForSequenceClassification\), not a language "
                                             r"model -- pass a policy"):
            load_causal_lm(str(reference), device="cpu")
    assert load_causal_lm(tiny_model_dir, device="cpu")[0].config.architectures[0].endswith("ForCausalLM")


def test_a_stage_output_directory_resolves_to_its_model(tmp_path):
    """`cai rl --out rl` writes rl/model/: `--model rl` means that model."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert resolve(str(tmp_path)) == str(tmp_path / "model")
    (tmp_path / "config.json").write_text("{}")  # a model directory itself wins
    assert resolve(str(tmp_path)) == str(tmp_path)


def test_precision_on_cpu_is_fp32_without_checkpointing():
    precision = precision_for("cpu")  # as on a CPU without native bf16 (conftest)
    assert precision.torch_dtype == torch.float32
    assert precision.trainer_kwargs() == {"bf16": False, "fp16": False, "gradient_checkpointing": False,
                                          "activation_checkpointing": False}
    assert precision_for("cpu", gradient_checkpointing=True).gradient_checkpointing


def test_inference_runs_bf16_only_where_the_cpu_multiplies_it_natively(monkeypatch):
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    assert inference_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    assert inference_dtype("cpu") == torch.float32  # emulated bf16 would be slower than fp32
    assert inference_dtype("cpu", "bf16") == torch.bfloat16  # asked for explicitly
    assert inference_dtype("cpu", "fp32") == torch.float32
    with pytest.raises(ConfigError, match="use one of auto, fp32, bf16"):
        inference_dtype("cpu", "fp16")


def test_engine_loads_in_the_precision_asked_for(tiny_model_dir):
    from cai.engine import Engine

    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        engine = Engine.from_reference(tiny_model_dir, device="cpu", precision=precision)
        assert next(engine.model.parameters()).dtype == dtype


def test_cast_weights_gives_the_model_loading_in_that_dtype_gives_where_to_dtype_does_not(tiny_model_dir):
    """`model.to(bf16)` also rounds the rotary frequencies (fp32 buffers) to bf16; benchmarks switching a
    model's precision must compute what cai computes when it loads in bf16."""
    from cai.models import cast_weights

    loaded, _ = load_causal_lm(tiny_model_dir, device="cpu", dtype=torch.bfloat16)
    cast, _ = load_causal_lm(tiny_model_dir, device="cpu", dtype=torch.float32)
    converted, _ = load_causal_lm(tiny_model_dir, device="cpu", dtype=torch.float32)
    cast_weights(cast, torch.bfloat16)
    converted.to(torch.bfloat16)
    ids = torch.tensor([list(range(3, 203))])  # long enough for positions to matter
    with torch.no_grad():
        logits = {name: m(ids).logits.float() for name, m in (("loaded", loaded), ("cast", cast),
                                                               ("converted", converted))}
    assert torch.equal(logits["cast"], logits["loaded"])
    assert not torch.equal(logits["converted"], logits["loaded"])
    if loaded.config.tie_word_embeddings:  # still one tensor
        assert cast.get_output_embeddings().weight is cast.get_input_embeddings().weight


def test_lora_zero_rank_is_a_config_error():
    with pytest.raises(ConfigError, match="--lora-r 0"):
        lora_config(0)


def test_lora_model_saves_as_standalone_merged_directory(tiny_model_dir, tmp_path):
    from peft import get_peft_model

    model, tokenizer = load_causal_lm(tiny_model_dir, device="cpu")
    peft_model = get_peft_model(model, lora_config(4))
    peft_model.eval()  # LoRA dropout would make the reference logits random
    with torch.no_grad():  # make the adapter do something, so merging matters
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    out = save_standalone(peft_model, tokenizer, tmp_path / "model")
    assert (out / "adapter" / "adapter_config.json").exists()
    assert not (out / "adapter_config.json").exists()  # top level is a plain model, no adapter step
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-4)


def test_4bit_loading_quantizes_linear_layers_on_cpu(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    model, _ = load_causal_lm(tiny_model_dir, quantize="4bit", device="cpu")
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Linear4bit" in kinds
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.slow
def test_embedded_model_prepares_a_loadable_directory():
    path = resolve("embedded:smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.num_hidden_layers == 30
    assert resolve("embedded:smollm2-135m-instruct") == path  # cached: no second conversion


def test_small_models_load_and_save_without_transformers_bars_large_ones_keep_them(tiny_model_dir, tmp_path,
                                                                                    capfd, monkeypatch):
    from transformers.utils import logging as hf_logging

    model, tokenizer = load_causal_lm(tiny_model_dir, device="cpu")
    save_standalone(model, tokenizer, tmp_path / "small")
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # switched back on for everything else
    monkeypatch.setattr(models, "WEIGHT_BARS_FROM_BYTES", 0)  # every model counts as large
    load_causal_lm(tiny_model_dir, device="cpu")
    assert "Loading weights" in capfd.readouterr().err


def test_an_adapter_trained_over_a_bf16_base_is_merged_in_fp32(tiny_model_dir, tmp_path):
    """RL's frozen base is bf16 on CPUs with native bf16; merging there would round a small update away."""
    from peft import get_peft_model

    model, tokenizer = load_causal_lm(tiny_model_dir, device="cpu", dtype=torch.bfloat16)
    peft_model = get_peft_model(model, lora_config(8))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 2e-4)  # about what tens of RL steps at lr 2e-5 leave
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    delta = (layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float()) * layer.scaling["default"]
    out = save_standalone(peft_model, tokenizer, tmp_path / "model", base_reference=tiny_model_dir)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    kept = merged.model.layers[0].self_attn.q_proj.weight - base.model.layers[0].self_attn.q_proj.weight
    assert ((kept - delta).norm() / delta.norm()).item() < 0.01


def test_a_built_model_is_readable_as_the_umask_allows_not_owner_only(tmp_path):
    import os

    previous = os.umask(0o022)
    try:
        built = models.build_tiny_random(tmp_path / "tiny")
    finally:
        os.umask(previous)
    assert built.stat().st_mode & 0o777 == 0o755
    assert {path.stat().st_mode & 0o777 for path in built.iterdir()} == {0o644}
