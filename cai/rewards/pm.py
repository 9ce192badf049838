"""The preference model's score as a trl reward (`PreferenceModelReward`), and where a PM lives.

The conversation is re-rendered with the PM's OWN tokenizer and chat template: a PM trained on one
template and fed text rendered with the policy's scores garbage without any error (a known trl pitfall).
"""

import json
from collections.abc import Sequence
from pathlib import Path

from cai.errors import ModelError
from cai.records import Message
from cai.rewards.combined import completion_text, prompt_messages


def pm_directory(path: str | Path) -> Path:
    """The model directory of a PM: `DIR` itself, or `DIR/model` when given a `cai pm train` output directory."""
    from cai.models import model_directory, unfinished_run

    path = Path(path).expanduser()
    directory = model_directory(path)
    if directory is not None:
        try:
            architectures = json.loads((directory / "config.json").read_text()).get("architectures") or []
        except (OSError, ValueError, AttributeError):
            architectures = []
        # A causal LM here (`--pm sl/model` for `--pm pm/model`) would load with a random score head.
        if any(name.endswith("ForCausalLM") for name in architectures):
            raise ModelError(f"{directory}: a language model ({architectures[0]}), not a preference model "
                             "-- pass the directory `cai pm train --out` wrote")
        return directory
    if path.is_dir() and (unfinished := unfinished_run(path)) is not None:
        raise ModelError(unfinished)
    raise ModelError(f"{path}: no preference model there (no config.json in it or in {path / 'model'}) -- "
                     "pass the directory `cai pm train --out` wrote")


PM_INFO = "cai-pm.json"  # written last into a saved PM directory by `cai pm train`: how it was trained (max_length, base)
PM_MAX_LENGTH = 2048  # tokens given to a PM that does not say what it was trained on (one not made by cai)


class PreferenceModelReward:
    """The preference model's score of each (conversation, answer), as a trl reward function.

    Loaded once. Each conversation plus the answer is rendered with the PM's own tokenizer and chat
    template (`render`), whatever the policy's template is, then scored in batches (sorted by length,
    right-padded, no gradient), as `cai pm train` fed it. A text longer than the PM's `max_length` (the
    one it was trained with, from its `cai-pm.json`) keeps its last tokens, where the answer is.
    """

    __name__ = "pm"

    def __init__(self, model_dir: str | Path, *, device: str | None = None, batch_size: int = 16,
                 max_length: int | None = None, model=None, tokenizer=None):
        if model is None:
            from cai.models import load_sequence_classifier

            directory = pm_directory(model_dir)
            model, tokenizer = load_sequence_classifier(str(directory), device=device)
            info = directory / PM_INFO
            if max_length is None and info.exists():
                max_length = json.loads(info.read_text()).get("max_length")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or PM_MAX_LENGTH
        self.last_texts: list[str] = []  # the texts of the last call, as the PM saw them (for inspection)

    def render(self, prompt: str | list[Message], completion: str | list[Message]) -> str:
        """The conversation and the answer in the PM's own chat template (the text it was trained on)."""
        messages = prompt_messages(prompt) + [{"role": "assistant", "content": completion_text(completion)}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        """The PM's logit for each rendered text, in input order."""
        import torch

        encoded = [ids[-self.max_length:] for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i]), reverse=True)
        scores: list[float] = [0.0] * len(texts)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                width = max(len(encoded[i]) for i in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):  # right padding, as the PM was trained
                    input_ids[row, :len(encoded[i])] = torch.tensor(encoded[i], dtype=torch.long)
                    attention[row, :len(encoded[i])] = 1
                logits = self.model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
                for row, i in enumerate(batch):  # logits: (B, 1)
                    scores[i] = float(logits[row, 0])
        return scores

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        self.last_texts = [self.render(p, c) for p, c in zip(prompts, completions, strict=True)]
        return self.score_texts(self.last_texts)
