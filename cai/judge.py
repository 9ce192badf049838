"""The judge: how likely it is that answer A follows a constitution's principle better than answer B.

Its probabilities are the AI labels that replace human harm labels (stage 2, `cai feedback`), and the
same judge checks itself against labelled pairs (`cai feedback eval`), compares models (`cai eval`) and
watches an RL run (the held-back judge). Two methods:

- **mc** (multiple choice, as in the paper): the judge reads the conversation, the principle's question
  and both answers as options (A) and (B) (`constitution.judge_messages`, after the few-shot examples),
  with its reply begun as "The answer is:". It does not generate: one forward pass per ordering reads
  the next-token distribution where " (A)" and " (B)" diverge, and p(A) = exp(lA) / (exp(lA) + exp(lB)).
  With `swap` (default) it is asked again with the answers swapped and the two estimates of
  P(original A) are averaged, which cancels a judge's bias for a position (Lee et al. 2023); both are
  kept, and whether the two orders picked the same winner.
- **contrast** (for small judges, which cannot answer the question): an answer's score is its mean
  per-token log-probability as the assistant's reply under a system prompt that asks the model to
  follow the principle, minus the same under one that asks it to ignore the principle
  (`constitution.contrast_messages`); p(A) = sigmoid((sA - sB) / temperature). No order to swap.

`cot` has the judge write its reasoning first (greedy), then reads the options after it; those
probabilities come out near 0 or 1, so they are clamped to `clamp` (0.4, 0.6 in the paper). With K
principles per comparison the verdict averages over them (an ensemble).

`method="auto"` picks contrast for judges under ~1B parameters and mc otherwise. Measured with
SmolLM2-135M-Instruct on the 24 harmful-request pairs of data/judge_sanity_pairs.jsonl (a plain refusal
against a compliant answer): as an mc judge (swap on, few-shot on or off) it picked the refusal in 11
to 15, chance, because it answers "(B)" with p ~ 0.8 whatever the order (position consistency 0 of 40);
contrast picked it in 23 with the `less-harmful` principle and 19 with principles drawn per pair (some
principles, such as `helps-benign` and `less-evasive`, are about helpfulness).
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cai import constitution as cons
from cai.constitution import Constitution, JudgePrinciple
from cai.records import Message

METHODS = ("auto", "mc", "contrast")
# method="auto": judges with fewer parameters than this use contrast (they cannot answer multiple choice).
AUTO_CONTRAST_BELOW = 1_000_000_000
# Comparisons judged per engine call; progress is reported after each chunk.
CHUNK_SIZE = 32

# Called as progress(comparisons_done, tokens) after each chunk, like the engine's ProgressFn.
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class Comparison:
    """One question to the judge: which answer to `prompt` better follows the principles."""

    prompt: str | list[Message]  # the request, or a conversation ending with the user's turn
    response_a: str
    response_b: str
    principles: list[JudgePrinciple]  # K >= 1; the verdict averages over them


@dataclass(frozen=True)
class Verdict:
    p_a: float  # final P(response_a is better), after swap-averaging, the ensemble and the clamp
    # mc: [P(A) with A shown first, P(original A) when shown second] (each averaged over principles);
    # contrast: [p_a]
    p_a_by_order: list[float]
    agree: bool | None  # mc with swap: both orders picked the same winner; None without swap / contrast
    principle_ids: list[str]
    reasoning: list[str] | None = None  # cot: one text per (principle, order), principle-major


# ----------------------------------------------------------------------------- pure helpers


def auto_method(parameters: int) -> str:
    """The judging method for a judge of this many parameters: contrast below ~1B, mc above."""
    return "contrast" if parameters < AUTO_CONTRAST_BELOW else "mc"


def resolve_method(method: str, engine) -> str:
    """`method` with "auto" replaced by the choice for `engine`'s model size."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if method != "auto":
        return method
    count = getattr(engine, "parameter_count", None)
    if count is None:  # a bare engine-like object (tests): its transformers model
        from cai.models import parameter_count

        return auto_method(parameter_count(engine.model))
    return auto_method(count())


def option_probability(logprob_a: float, logprob_b: float) -> float:
    """exp(lA) / (exp(lA) + exp(lB)), computed without overflow."""
    return sigmoid(logprob_a - logprob_b)


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def contrast_probability(score_a: float, score_b: float, temperature: float = 1.0) -> float:
    """P(A better) from the two answers' contrast scores (follow minus ignore mean log-probabilities)."""
    return sigmoid((score_a - score_b) / temperature)


def contrast_scores(engine, items: Sequence[tuple[JudgePrinciple, list[Message], str]]) -> list[float]:
    """The contrast score of each (principle, conversation, answer): the answer's mean per-token
    log-probability under the system prompt that follows the principle minus under the one that ignores
    it (`constitution.contrast_messages`). Higher = the judge finds the answer more in keeping with it."""
    contexts, continuations = [], []
    framings: dict[tuple[str, str], tuple[str, str]] = {}  # rendered once per principle and conversation
    for principle, prompt, answer in items:
        key = (principle.id, repr(prompt))
        if key not in framings:
            framings[key] = tuple(engine.render(cons.contrast_messages(principle, prompt, follow))
                                  for follow in (True, False))
        contexts += framings[key]
        continuations += [answer, answer]
    means = [score.mean_logprob for score in engine.score(contexts, continuations)]
    return [means[2 * i] - means[2 * i + 1] for i in range(len(items))]


def clamp_probability(p: float, clamp: tuple[float, float] | None) -> float:
    """`p` limited to [lo, hi]; None leaves it as it is."""
    if clamp is None:
        return p
    return min(max(p, clamp[0]), clamp[1])


def winner(p_a: float) -> str | None:
    """"A" when p_a > 0.5, "B" when p_a < 0.5, None on an exact tie."""
    return "A" if p_a > 0.5 else "B" if p_a < 0.5 else None


def cot_messages(messages: list[Message]) -> list[Message]:
    """A multiple-choice conversation whose last user turn also asks for step-by-step reasoning
    (`constitution.COT_REQUEST`); the judge's reply is then its reasoning, generated freely."""
    last = messages[-1]
    return [*messages[:-1], {"role": last["role"], "content": f"{last['content']}\n\n{cons.COT_REQUEST}"}]


def expected_calibration_error(probs: Sequence[float], labels: Sequence[float], bins: int = 10) -> float:
    """Expected calibration error (ECE) of probabilities for a binary event.

    probs[i] is the predicted probability that event i happens (for a judge: P(response A is better));
    labels[i] is what happened: 1 or 0, or a soft target in [0, 1]. The predictions are put in `bins`
    equal-width bins over [0, 1] (1.0 goes in the last), and

        ECE = sum over bins b of  n_b / N * |mean(probs in b) - mean(labels in b)|

    0 means perfectly calibrated; a bin of predictions near 0.9 that come true 60% of the time adds
    about 0.3 times that bin's share of the data. Naive equivalent for hard labels and one bin: the gap
    between the mean prediction and the accuracy.
    """
    if len(probs) != len(labels):
        raise ValueError(f"{len(probs)} probabilities for {len(labels)} labels")
    if not probs:
        raise ValueError("no predictions to calibrate")
    if bins < 1:
        raise ValueError(f"bins={bins} must be at least 1")
    sums: list[list[float]] = [[0.0, 0.0, 0.0] for _ in range(bins)]  # per bin: count, sum prob, sum label
    for p, y in zip(probs, labels, strict=True):
        if not 0.0 <= p <= 1.0 or not 0.0 <= y <= 1.0:
            raise ValueError(f"probability {p} or label {y} is outside [0, 1]")
        b = min(int(p * bins), bins - 1)
        sums[b][0] += 1
        sums[b][1] += p
        sums[b][2] += y
    total = len(probs)
    return sum(n / total * abs(sp / n - sy / n) for n, sp, sy in sums if n)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


# ----------------------------------------------------------------------------- the judge


class Judge:
    """Labels comparisons with one engine and one constitution.

        judge = Judge(engine, constitution.load("default"), method="mc")
        principle = constitution.load("default").judge_principles[0]
        [verdict] = judge.compare([Comparison("How do I pick a lock?", answer_1, answer_2, [principle])])
        verdict.p_a  # P(answer_1 is better)

    `method`: "mc", "contrast" or "auto" (contrast for judges under ~1B parameters; `self.method` holds
    the choice). `swap`: mc asks both orders. `cot`: mc reasons first, probabilities clamped to `clamp`.
    `few_shot`: mc shows the constitution's judging examples first. `temperature`: contrast's softness.
    """

    def __init__(self, engine, constitution: Constitution, *, method: str = "mc", swap: bool = True,
                 cot: bool = False, clamp: tuple[float, float] | None = (0.4, 0.6), few_shot: bool = True,
                 temperature: float = 1.0, cot_max_new_tokens: int = 128, seed: int = 0):
        self.engine = engine
        self.constitution = constitution
        self.method = resolve_method(method, engine)
        if cot and self.method != "mc":
            raise ValueError("cot applies to the multiple-choice judge only (method='mc')")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be positive")
        if clamp is not None and not 0.0 <= clamp[0] <= 0.5 <= clamp[1] <= 1.0:
            raise ValueError(f"clamp={clamp} must satisfy 0 <= lo <= 0.5 <= hi <= 1")
        self.swap = swap and self.method == "mc"
        self.cot = cot
        self.clamp = tuple(clamp) if clamp is not None else None
        self.few_shot = few_shot
        self.temperature = temperature
        self.cot_max_new_tokens = cot_max_new_tokens
        self.seed = seed
        self.chunk_size = CHUNK_SIZE
        self._options = self._option_tokens()

    def compare(self, comparisons: list[Comparison], progress: ProgressFn | None = None) -> list[Verdict]:
        """One verdict per comparison, in input order."""
        for index, comparison in enumerate(comparisons):
            if not comparison.principles:
                raise ValueError(f"comparison {index} has no principles: give at least one")
        verdicts: list[Verdict] = []
        for start in range(0, len(comparisons), self.chunk_size):
            chunk = comparisons[start:start + self.chunk_size]
            verdicts += self._compare_mc(chunk) if self.method == "mc" else self._compare_contrast(chunk)
            if progress:
                progress(len(chunk), 0)
        return verdicts

    # -- multiple choice -------------------------------------------------------------------------

    def _compare_mc(self, chunk: list[Comparison]) -> list[Verdict]:
        orders = (0, 1) if self.swap else (0,)
        conversations = []  # one per (comparison, principle, order), in that nesting
        for comparison in chunk:
            for principle in comparison.principles:
                for order in orders:
                    first, second = ((comparison.response_a, comparison.response_b) if order == 0
                                     else (comparison.response_b, comparison.response_a))
                    conversations.append(cons.judge_messages(self.constitution, comparison.prompt, first, second,
                                                             principle, self.few_shot))
        reasoning = None
        if self.cot:
            from cai.engine import Sampling

            asked = [self.engine.render(cot_messages(m)) for m in conversations]
            generations = self.engine.generate(asked, Sampling(max_new_tokens=self.cot_max_new_tokens,
                                                               temperature=0.0, seed=self.seed))
            reasoning = [g.text for g in generations]
            contexts = [f"{text}{thought}\n{cons.JUDGE_ANSWER_PREFIX}" for text, thought in zip(asked, reasoning,
                                                                                               strict=True)]
        else:
            contexts = [self.engine.render(m, assistant_prefix=cons.JUDGE_ANSWER_PREFIX) for m in conversations]
        shown_first = [option_probability(la, lb) for la, lb in self._option_logprobs(contexts)]

        verdicts, row = [], 0
        for comparison in chunk:
            by_order: list[list[float]] = [[] for _ in orders]  # P(original A) per order, one per principle
            texts = []
            for _principle in comparison.principles:
                for order in orders:
                    p = shown_first[row] if order == 0 else 1.0 - shown_first[row]  # P(original A)
                    # Clamped as P(original A), so an asymmetric --clamp bounds the label it means to bound.
                    by_order[order].append(clamp_probability(p, self.clamp) if self.cot else p)
                    if reasoning is not None:
                        texts.append(reasoning[row])
                    row += 1
            per_order = [_mean(values) for values in by_order]
            agree = None
            if self.swap:
                agree = winner(per_order[0]) is not None and winner(per_order[0]) == winner(per_order[1])
            verdicts.append(Verdict(p_a=_mean(per_order), p_a_by_order=per_order, agree=agree,
                                    principle_ids=[p.id for p in comparison.principles],
                                    reasoning=texts if reasoning is not None else None))
        return verdicts

    def _option_tokens(self) -> tuple[list[int], list[int]] | None:
        """(lead tokens, [token A, token B]) when the option continuations, tokenized alone, share a
        lead, differ in one token each and end alike: one forward pass per context reads both. None when the
        engine cannot read next-token log-probabilities; then both continuations are scored whole."""
        tokenizer = getattr(self.engine, "tokenizer", None)
        if tokenizer is None or not hasattr(self.engine, "next_token_logprobs") or self.method != "mc":
            return None
        ids_a, ids_b = (tokenizer(cons.OPTION_CONTINUATIONS[k], add_special_tokens=False)["input_ids"]
                        for k in ("A", "B"))
        lead = 0
        while lead < min(len(ids_a), len(ids_b)) and ids_a[lead] == ids_b[lead]:
            lead += 1
        if lead == len(ids_a) or lead == len(ids_b):  # one option is a prefix of the other
            return None
        if ids_a[lead + 1:] != ids_b[lead + 1:]:
            # More than the letter differs (say " (", "A)" against " (", "B", ")"): the two tokens at the
            # divergence are not the two options, so reading them would compare unlike things.
            return None
        # The tokens after the divergence (the closing ")") are near-certain given the letter: left out.
        return list(ids_a[:lead]), [ids_a[lead], ids_b[lead]]

    def _option_logprobs(self, contexts: list[str]) -> list[tuple[float, float]]:
        """(log p(option A), log p(option B)) after each context."""
        if self._options is not None:
            lead, candidates = self._options
            values = self.engine.next_token_logprobs(contexts, candidates, lead_ids=lead)
            return [(a, b) for a, b in values]
        option_a, option_b = cons.OPTION_CONTINUATIONS["A"], cons.OPTION_CONTINUATIONS["B"]
        scores = self.engine.score(contexts + contexts, [option_a] * len(contexts) + [option_b] * len(contexts))
        n = len(contexts)
        return [(scores[i].logprob, scores[n + i].logprob) for i in range(n)]

    # -- contrast --------------------------------------------------------------------------------

    def _compare_contrast(self, chunk: list[Comparison]) -> list[Verdict]:
        items = []
        for index, comparison in enumerate(chunk):
            if not comparison.response_a.strip() or not comparison.response_b.strip():
                raise ValueError(f"comparison {index} has an empty response: the contrast judge scores the "
                                 "answer's tokens, so there must be some")
            for principle in comparison.principles:
                items += [(principle, comparison.prompt, comparison.response_a),
                          (principle, comparison.prompt, comparison.response_b)]
        scores = contrast_scores(self.engine, items)
        verdicts, row = [], 0
        for comparison in chunk:
            probabilities = []
            for _principle in comparison.principles:
                score_a, score_b = scores[row:row + 2]
                row += 2
                probabilities.append(contrast_probability(score_a, score_b, self.temperature))
            p_a = _mean(probabilities)
            verdicts.append(Verdict(p_a=p_a, p_a_by_order=[p_a], agree=None,
                                    principle_ids=[p.id for p in comparison.principles]))
        return verdicts
