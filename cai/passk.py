"""pass@k: how often a model solves a verifiable problem (a maths `answer`, code `tests`) in k tries.

From n >= k sampled answers to a problem, c of them correct, the unbiased estimate of the chance that
at least one of k answers drawn from those n is correct is (Chen et al. 2021, "Evaluating Large
Language Models Trained on Code")

    pass@k = 1 - C(n - c, k) / C(n, k)

and of the chance that all k are correct (reliability: solved in every one of k tries)

    all@k = C(c, k) / C(n, k).

`cai eval` reports both per model beside greedy pass@1; `cai filter` keeps the prompts with pass@k > 0
and all@k < 1 under the starting policy, the ones whose GRPO groups of k can mix right and wrong.
Answers are checked with the RL stage's own rewards (`cai.rewards`): maths by the final number, code
by running the tests in the sandbox.
"""

import hashlib
from collections.abc import Callable, Sequence
from math import comb
from typing import Any

# (conversations, sample index, record ids) -> one answer text per conversation. The engine in a run
# (`engine_sampler`); a stub in tests.
Sampler = Callable[[list[list[dict[str, str]]], int, list[str]], list[str]]


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k): the chance that k of the n answers, drawn without replacement, include a
    correct one, when c of the n are correct. Exact (integer binomials)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def all_at_k(n: int, c: int, k: int) -> float:
    """C(c, k) / C(n, k): the chance that k of the n answers, drawn without replacement, are all correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"all@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return comb(c, k) / comb(n, k)


def is_verifiable(record: dict[str, Any]) -> bool:
    """A record with an `answer` (maths) or `tests` (code) to check answers against."""
    return any(record.get(key) not in (None, "", []) for key in ("answer", "tests"))


def check_answers(records: Sequence[dict[str, Any]], path: Any) -> None:
    """Every `answer` is one number the maths reward can compare with; else a RecordsError naming the record."""
    from cai.errors import RecordsError
    from cai.rewards import parse_number

    for record in records:
        answer = record.get("answer")
        if answer not in (None, "") and parse_number(str(answer)) is None:
            raise RecordsError(f"{path}: record {record['id']!r}: answer {answer!r} is not one number -- write it "
                               "as 42, -3/4, 1,234.5 or 25% (or leave `answer` out)")


def _tests_source(tests: Any) -> str:
    return "\n".join(tests) if isinstance(tests, list) else str(tests)


def score_answers(records: Sequence[dict[str, Any]], texts: Sequence[str], code_reward=None) -> list[float]:
    """1.0 or 0.0 for each (record, answer text): the maths reward where the record has an `answer`,
    else the code reward (its sandbox) where it has `tests`."""
    from cai.rewards import CodeReward, math_score

    scores: list[float] = [0.0] * len(texts)
    code_jobs = []
    for i, (record, text) in enumerate(zip(records, texts, strict=True)):
        if record.get("answer") not in (None, ""):
            scores[i] = math_score(text, record["answer"])
        elif record.get("tests") not in (None, "", []):
            code_jobs.append(i)
    if code_jobs:
        code_reward = code_reward or CodeReward()
        values = code_reward([records[i]["prompt"] for i in code_jobs], [texts[i] for i in code_jobs],
                             tests=[_tests_source(records[i]["tests"]) for i in code_jobs])
        for i, value in zip(code_jobs, values, strict=True):
            scores[i] = float(value or 0.0)
    return scores


def sample_seed(record_id: str, index: int) -> int:
    """A seed for answer `index` to `record_id` that depends on nothing else (batching, order, resume)."""
    return int.from_bytes(hashlib.sha256(f"{record_id}/{index}".encode()).digest()[:4], "little")


def engine_sampler(engine, max_new_tokens: int, temperature: float, seed: int = 0) -> Sampler:
    """A `Sampler` over an `Engine`: answer `index` to record `ids[i]` is sampled with the seed of
    (`ids[i]`, index), so it is the same text in any batch and after a resume."""
    from cai.engine import Sampling

    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)

    def sample(conversations, index, ids):
        seeds = [sample_seed(record_id, index) for record_id in ids]
        return [g.text for g in engine.generate_chat(conversations, sampling, seeds=seeds)]

    return sample


def sample_scores(records: Sequence[dict[str, Any]], make_sampler: Callable[[], Sampler], samples: int,
                  batch_size: int, writer, prefix: str = "", progress: Callable[[int], None] | None = None
                  ) -> dict[str, list[float]]:
    """`samples` scored answers to each verifiable record: id -> one 1.0/0.0 per answer, in sample order.

    Answer i of every record is drawn by the sampler (`make_sampler()`, called only if an answer is
    missing) and appended to `writer` (a `RecordWriter`) as `PREFIX + ID/i` with its score; answers the
    writer's file already holds are read back, not drawn again, so a killed run resumes."""
    from cai.records import as_messages, read_jsonl

    wanted = [r for r in records if is_verifiable(r)]
    found: dict[str, dict[int, float]] = {r["id"]: {} for r in wanted}
    if writer.path.exists() and writer.path.stat().st_size:
        for _, row in read_jsonl(writer.path):
            if row.get("prefix", "") == prefix and row.get("prompt_id") in found and row["sample"] < samples:
                found[row["prompt_id"]][row["sample"]] = float(row["score"])
    sampler = None
    for index in range(samples):
        todo = [r for r in wanted if index not in found[r["id"]]]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            sampler = sampler or make_sampler()
            texts = sampler([as_messages(r["prompt"]) for r in chunk], index, [r["id"] for r in chunk])
            for record, text, score in zip(chunk, texts, score_answers(chunk, texts), strict=True):
                writer.append({"id": f"{prefix}{record['id']}/{index}", "prefix": prefix, "prompt_id": record["id"],
                               "sample": index, "answer": text, "score": score})
                found[record["id"]][index] = score
            if progress is not None:
                progress(len(chunk))
    return {record_id: [by_index[i] for i in sorted(by_index)] for record_id, by_index in found.items()}


def summarize(greedy: dict[str, float], correct: dict[str, list[float]], k: int) -> dict[str, Any]:
    """Per-model figures: greedy pass@1, sampled pass@1 and pass@k and all@k (means over problems), and
    how many problems were never / always / sometimes solved in the n samples.

    `greedy`: problem id -> 1.0/0.0 for the greedy answer; `correct`: problem id -> one 1.0/0.0 per sample."""
    figures: dict[str, Any] = {"problems": len(greedy) or len(correct)}
    if greedy:
        figures["pass@1"] = sum(greedy.values()) / len(greedy)
    if correct:
        n = min(len(v) for v in correct.values())
        counts = [int(sum(v[:n])) for v in correct.values()]
        figures.update({
            "k": k, "n": n,
            "pass@1_sampled": sum(pass_at_k(n, c, 1) for c in counts) / len(counts),
            "pass@k": sum(pass_at_k(n, c, k) for c in counts) / len(counts),
            "all@k": sum(all_at_k(n, c, k) for c in counts) / len(counts),
            "never_solved": sum(1 for c in counts if c == 0),
            "always_solved": sum(1 for c in counts if c == n),
        })
    return figures
