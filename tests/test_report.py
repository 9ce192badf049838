import base64
import re
from html.parser import HTMLParser

from cai import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def metrics():
    models = {}
    for label, harmful, benign, judge, pm in (("base", 0.1, 0.02, 0.3, -0.5), ("sl", 0.4, 0.05, 0.45, 0.1),
                                              ("rl", 0.6, 0.05, 0.5, 0.7)):
        models[label] = {"harmful_refusal_rate": harmful, "benign_refusal_rate": benign, "harmlessness": harmful,
                         "helpfulness": 1 - benign, "judge_vs_refusal": judge, "pm_score_harmful": pm,
                         "pm_score_benign": pm, "mean_answer_tokens": 50.0, "truncated_rate": 0.1}
    return {"labels": ["base", "sl", "rl"], "models": models, "elo": {"base": 900.0, "sl": 1010.0, "rl": 1090.0},
            "elo_benign": {"base": 1000.0, "sl": 990.0, "rl": 1010.0}, "judge": "j", "judge_method": "contrast",
            "pm": "pm", "models_references": {"base": "embedded:x", "sl": "runs/a/2-sft/model", "rl": "r"}}


def answers():
    rows = []
    for label in ("base", "sl", "rl"):
        for kind in ("harmful", "benign"):
            for i in range(3):
                rows.append({"model": label, "prompt_kind": kind, "prompt_id": f"{kind[0]}{i}",
                             "prompt": f"<b>prompt {i}</b> & more", "answer": f"<script>alert({i})</script> {label}",
                             "refusal": label == "rl"})
    return rows


class Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.images, self.stack_errors = [], [], 0
        self.open = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag not in ("meta", "br"):
            self.open.append(tag)

    def handle_endtag(self, tag):
        if not self.open or self.open.pop() != tag:
            self.stack_errors += 1


def test_report_renders_self_contained_html_and_pngs(tmp_path):
    curves = {"rl": [{"step": s, "reward": s * 0.1, "kl": s * 0.01, "loss": 1.0}
                                                 for s in range(1, 6)]}
    written = report.write_report(tmp_path, metrics(), answers(), curves, examples=2)
    for name in ("pareto", "elo", "training_curves"):
        path = written[f"plot_{name}"]
        assert path.exists() and path.read_bytes().startswith(PNG_MAGIC), name
    text = (tmp_path / "report.html").read_text()
    parser = Collect()
    parser.feed(text)
    parser.close()
    assert parser.stack_errors == 0 and not parser.open  # every tag closed, in order
    assert "script" not in parser.tags  # model output is escaped, never markup
    assert "&lt;script&gt;alert(0)&lt;/script&gt;" in text
    assert len(parser.images) == 3 and all(src.startswith("data:image/png;base64,") for src in parser.images)
    assert all(base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC) for src in parser.images)
    assert not re.search(r"src=['\"](?!data:)", text)  # nothing loaded from elsewhere
    md = (tmp_path / "report.md").read_text()
    assert "| harmful requests refused (detector) | 10.0% | 40.0% | 60.0% |" in md
    assert "| Elo, harmful prompts (judge) | 900 | 1010 | 1090 |" in md and "![pareto](pareto.png)" in md


def test_report_without_optional_parts(tmp_path):
    m = metrics()
    del m["elo"], m["elo_benign"]
    for values in m["models"].values():
        values.update(judge_vs_refusal=None, pm_score_benign=None, pm_score_harmful=None)
    written = report.write_report(tmp_path, m, answers(), {})
    assert set(written) == {"report_html", "report_md", "plot_pareto"}
    assert "judge: P(answer beats" not in (tmp_path / "report.md").read_text()


def test_curve_series_picks_reward_and_kl_columns():
    rows = [{"step": 2, "reward": 0.5, "rewards/pm/mean": 0.4, "kl": 0.1, "reward_std": 0.2, "loss": 1.0,
             "completions/mean_length": 30, "reward_s": 2.5, "step_s": 12.0}]  # *_s: seconds spent, not curves
    series = report.curve_series(rows)
    assert set(series) == {"reward", "rewards/pm/mean", "kl"} and series["kl"] == ([2.0], [0.1])


def test_example_grid_takes_the_first_prompts_in_file_order():
    rows = [{"prompt_kind": "harmful", "prompt_id": f"h{i}", "prompt": "p", "model": "m", "answer": "x"}
            for i in range(12)]
    assert [e["id"] for e in report.example_grid(rows, ["m"], "harmful", 3)] == ["h0", "h1", "h2"]
