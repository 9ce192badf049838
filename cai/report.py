"""The eval report: report.md and a self-contained report.html (plots embedded), plus the plots as PNGs.

What it shows, from `cai eval`'s metrics and answers:

- harmlessness against helpfulness per model, the CAI paper's Pareto picture (harmlessness = share of
  harmful requests refused; helpfulness = share of benign requests not refused), and beside it the
  judge's and the PM's view when those were measured;
- Elo ratings from head-to-head judge comparisons;
- accuracy on verifiable problems per model (greedy pass@1, sampled pass@k and all@k) when measured;
- reward and KL curves over RL steps when a model came with a training log (`metrics.jsonl`);
- example answers side by side (HTML-escaped: model output is never trusted as markup).
"""

import base64
import html
import math
from pathlib import Path
from typing import Any

METRIC_ROWS = [  # (metrics key, label, format)
    ("harmful_refusal_rate", "harmful requests refused (detector)", "pct"),
    ("benign_refusal_rate", "benign requests refused: over-refusal (detector)", "pct"),
    ("judge_vs_refusal", "judge: P(answer beats a plain refusal), harmful prompts", "prob"),
    ("pm_score_harmful", "PM score, harmful prompts", "num"),
    ("pm_score_benign", "PM score, benign prompts", "num"),
    ("mean_answer_tokens", "mean answer length (tokens)", "num"),
    ("truncated_rate", "answers cut at max tokens", "pct"),
]


BENCHMARK_NOTE = ("Refusal detector on sets written by others, apart from the bundled prompts above; "
                  "[low-high] is the 95% Wilson interval, n the prompts answered.")


def _fmt(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if kind == "pct":
        return f"{value * 100:.1f}%"
    if kind == "prob":
        return f"{value:.3f}"
    if kind == "int":
        return f"{value:.0f}"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------- plots


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(metrics: dict[str, Any], path: Path) -> Path:
    plt = _figure()
    labels = metrics["labels"]
    models = metrics["models"]
    panels = [("helpfulness", "harmlessness", "helpfulness: benign requests answered",
               "harmlessness: harmful requests refused")]
    if any(models[label].get("pm_score_benign") is not None for label in labels) and \
            any(models[label].get("judge_vs_refusal") is not None for label in labels):
        panels.append(("pm_score_benign", "judge_vs_refusal", "PM score on benign answers",
                       "judge: P(answer beats a refusal)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    for axis, (x_key, y_key, x_label, y_label) in zip(axes[0], panels, strict=True):
        xs = [models[label].get(x_key) for label in labels]
        ys = [models[label].get(y_key) for label in labels]
        points = [(x, y, label) for x, y, label in zip(xs, ys, labels, strict=True) if x is not None and y is not None]
        for (x0, y0, _), (x1, y1, _) in zip(points, points[1:], strict=False):
            axis.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops={"arrowstyle": "->", "color": "0.6"})
        seen: dict[tuple[float, float], int] = {}
        for index, (x, y, label) in enumerate(points):
            place = (round(x, 3), round(y, 3))
            stacked = seen.get(place, 0)  # models at the same point: labels one under the other
            seen[place] = stacked + 1
            axis.scatter([x], [y], s=60, zorder=3, color=f"C{index}", label=label)
            axis.annotate(label, (x, y), textcoords="offset points", xytext=(7, 5 - 12 * stacked))
        if x_key == "helpfulness":
            axis.set_xlim(-0.05, 1.05)
            axis.set_ylim(-0.05, 1.05)
        axis.set_xlabel(x_label)
        axis.set_ylabel(y_label)
        axis.grid(alpha=0.3)
        if points:
            axis.legend(fontsize=8, loc="lower left")
    fig.suptitle("Harmlessness vs helpfulness (up and right is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy(metrics: dict[str, Any], path: Path) -> Path | None:
    """Bars of pass@1 (greedy), pass@k and all@k per model, on the verifiable problems."""
    labels = metrics["labels"]
    found = {label: metrics["models"][label].get("verifiable") for label in labels}
    if not any(found.values()):
        return None
    k = next(v["k"] for v in found.values() if v and "k" in v) if any(v and "k" in v for v in found.values()) else None
    series = [("pass@1", "pass@1 (greedy)")]
    if k is not None:
        series += [("pass@k", f"pass@{k} (sampled)"), ("all@k", f"all@{k}: solved in all {k} tries")]
    values = {key: [(found[label] or {}).get(key, math.nan) for label in labels] for key, _ in series}
    return _grouped_bars(labels, series, values, "share of problems solved", path, ylim=(0, 1))


def plot_elo(metrics: dict[str, Any], path: Path) -> Path | None:
    series = [(key, title) for key, title in (("elo", "harmful prompts (harmlessness)"),
                                              ("elo_benign", "benign prompts")) if metrics.get(key)]
    if not series:
        return None
    labels = metrics["labels"]  # a model without a rating gets no bar (nan)
    values = {key: [metrics[key].get(label, math.nan) - 1000.0 for label in labels] for key, _ in series}
    return _grouped_bars(labels, series, values, "Elo - 1000 (judge, head to head)", path, zero_line=True)


def _grouped_bars(labels: list[str], series: list[tuple[str, str]], values: dict[str, list[float]], ylabel: str,
                  path: Path, ylim: tuple[float, float] | None = None, zero_line: bool = False) -> Path:
    """One group of bars per model label, one bar per series (key, legend title) in each group."""
    plt = _figure()
    fig, axis = plt.subplots(figsize=(5.5, 3.8))
    width = 0.8 / len(series)
    for index, (key, title) in enumerate(series):
        positions = [i + (index - (len(series) - 1) / 2) * width for i in range(len(labels))]
        axis.bar(positions, values[key], width=width, label=title)
    axis.set_xticks(range(len(labels)), labels)
    if ylim is not None:
        axis.set_ylim(*ylim)
    if zero_line:
        axis.axhline(0, color="0.3", linewidth=0.8)
    axis.set_ylabel(ylabel)
    axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curve_series(rows: list[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """Reward and KL columns of a training log -> {column: (steps, values)}; not their spreads (`_std`)
    nor the seconds spent computing them (`_s`, as rl's metrics log `reward_s`)."""
    columns = sorted({k for row in rows for k, v in row.items()
                      if isinstance(v, int | float) and not isinstance(v, bool)
                      and ("reward" in k.lower() or "kl" in k.lower().split("/")[-1].split("_"))
                      and not k.lower().endswith(("_std", "_s"))})
    series = {}
    for column in columns:
        xs, ys = [], []
        for index, row in enumerate(rows):
            value = row.get(column)
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                xs.append(float(row.get("step", index)))
                ys.append(float(value))
        if ys:
            series[column] = (xs, ys)
    return series


def plot_curves(curves: dict[str, list[dict[str, Any]]], path: Path) -> Path | None:
    """Reward and KL over steps; `curves` is keyed by the model's eval label, which names it in the legend."""
    named = {label: curve_series(rows) for label, rows in curves.items()}
    named = {label: series for label, series in named.items() if series}
    if not named:
        return None
    plt = _figure()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, series in named.items():
        for column, (xs, ys) in series.items():
            axis = axes[1] if "kl" in column.lower().split("/")[-1].split("_") else axes[0]
            axis.plot(xs, ys, label=f"{label}: {column}", marker="." if len(xs) < 40 else None)
    axes[0].set_title("reward over training steps")
    axes[1].set_title("KL to the reference policy")
    for axis in axes:
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- tables


def metric_rows(metrics: dict[str, Any]) -> list[list[str]]:
    labels = metrics["labels"]
    rows = []
    for key, title, kind in METRIC_ROWS:
        values = [metrics["models"][label].get(key) for label in labels]
        if all(v is None for v in values):
            continue
        rows.append([title, *[_fmt(v, kind) for v in values]])
    verifiable = [metrics["models"][label].get("verifiable") or {} for label in labels]
    k = next((v["k"] for v in verifiable if "k" in v), None)
    for key, title in (("pass@1", "verifiable problems solved, greedy: pass@1"),
                       ("pass@k", f"solved in at least one of {k} tries: pass@{k}"),
                       ("all@k", f"solved in all {k} tries: all@{k}")):
        if any(key in v for v in verifiable):
            rows.append([title, *[_fmt(v.get(key), "pct") for v in verifiable]])
    for key, title in (("elo", "Elo, harmful prompts (judge)"), ("elo_benign", "Elo, benign prompts (judge)")):
        if metrics.get(key):
            rows.append([title, *[_fmt(metrics[key].get(label), "int") for label in labels]])
    return rows


def benchmark_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """One row per third-party set and side: refusal rate, its 95% Wilson interval and n, per model."""
    rows = []
    for entry in metrics.get("benchmarks", {}).values():
        what = "refused (harmless)" if entry["side"] == "harmful" else "refused (over-refusal)"
        cells = []
        for label in metrics["labels"]:
            value = entry["models"].get(label)
            cells.append("n/a" if value is None else f"{value['refusal_rate'] * 100:.1f}% "
                         f"[{value['ci95'][0] * 100:.1f}-{value['ci95'][1] * 100:.1f}], n={value['n']}")
        rows.append([f"{entry['set']}: {entry['side']} requests {what}", *cells])
    return rows


def example_grid(answers: list[dict[str, Any]], labels: list[str], kind: str, count: int) -> list[dict[str, Any]]:
    """The first `count` prompts of a kind with every model's answer: [{prompt, answers: {label: answer}}]."""
    by_prompt: dict[str, dict[str, Any]] = {}
    for answer in answers:
        if answer["prompt_kind"] != kind or answer.get("set") is not None:
            continue
        entry = by_prompt.setdefault(answer["prompt_id"], {"prompt": answer["prompt"], "answers": {}})
        entry["answers"][answer["model"]] = answer
    ids = list(by_prompt)[:count]  # answers come in prompt-file order; sorted ids would put h10 before h2
    return [by_prompt[i] | {"id": i} for i in ids if all(label in by_prompt[i]["answers"] for label in labels)]


def _prompt_str(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


# ----------------------------------------------------------------------------- writers

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 6px 8px; vertical-align: top; text-align: left; }
th { background: #f3f3f3; }
td.answer { white-space: pre-wrap; font-size: 0.85em; max-width: 360px; }
td.refusal { background: #eef6ee; }
img { max-width: 100%; }
.note { color: #666; font-size: 0.9em; }
"""


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(out_dir: str | Path, metrics: dict[str, Any], answers: list[dict[str, Any]],
                 curves: dict[str, list[dict[str, Any]]] | None = None, examples: int = 6) -> dict[str, Path]:
    """Write the plots, report.md and report.html into `out_dir`; returns {name: path}. `curves` holds each
    model's training-log rows, keyed by its label in `metrics["labels"]`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = metrics["labels"]
    plots: dict[str, Path] = {}
    if any(metrics["models"][label].get("harmlessness") is not None or
           metrics["models"][label].get("helpfulness") is not None for label in labels):
        plots["pareto"] = plot_pareto(metrics, out / "pareto.png")
    if (accuracy := plot_accuracy(metrics, out / "accuracy.png")) is not None:
        plots["accuracy"] = accuracy
    if (elo := plot_elo(metrics, out / "elo.png")) is not None:
        plots["elo"] = elo
    if (curve := plot_curves(curves or {}, out / "training_curves.png")) is not None:
        plots["training_curves"] = curve
    header = ["metric", *labels]
    rows = metric_rows(metrics)
    grids = {kind: example_grid(answers, labels, kind, examples) for kind in ("harmful", "benign", "verifiable")}
    captions = {
        "pareto": "Harmlessness (harmful requests refused) against helpfulness (benign requests answered), "
                  "per model; arrows follow the pipeline order.",
        "accuracy": "Share of the verifiable problems each model solves: greedy (pass@1), in at least one of k "
                    "sampled tries (pass@k, unbiased estimate from n samples) and in all k (all@k).",
        "elo": "Elo ratings from head-to-head comparisons by the constitution judge (order swapped, soft wins, "
               "Bradley-Terry fit; 1000 = average).",
        "training_curves": "Reward and KL over training steps, from the training log beside the model.",
    }
    references = metrics.get("models_references", {})
    judge_note = (f"judge: {metrics.get('judge')} ({metrics.get('judge_method')})" if metrics.get("judge")
                  else "no judge")

    # report.md
    md = ["# cai eval report\n", f"Models: {', '.join(f'`{k}` = {references.get(k, k)}' for k in labels)}; "
          f"{judge_note}; PM: {metrics.get('pm') or 'none'}.\n", _md_table(header, rows), ""]
    third_party = benchmark_rows(metrics)
    if third_party:
        md += ["## Third-party sets", "", BENCHMARK_NOTE, "", _md_table(["set", *labels], third_party), ""]
    for name, path in plots.items():
        md += [f"![{name}]({path.name})", "", captions[name], ""]
    for kind, grid in grids.items():
        if not grid:
            continue
        md += [f"## Example answers: {kind} prompts", ""]
        table_rows = [[_prompt_str(e["prompt"])[:200], *[e["answers"][label]["answer"][:300] for label in labels]]
                      for e in grid]
        md += [_md_table(["prompt", *labels], table_rows), ""]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")

    # report.html: one file, images inline
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>cai eval report</title>"
             f"<style>{_CSS}</style></head><body><h1>cai eval report</h1>",
             "<p>" + html.escape(", ".join(f"{k} = {references.get(k, k)}" for k in labels)) + "<br>"
             + html.escape(f"{judge_note}; PM: {metrics.get('pm') or 'none'}") + "</p>",
             "<h2>Metrics</h2>", _html_table(header, rows)]
    if third_party:
        parts += ["<h2>Third-party sets</h2>", f"<p class='note'>{html.escape(BENCHMARK_NOTE)}</p>",
                  _html_table(["set", *labels], third_party)]
    for name, path in plots.items():
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f"<h2>{html.escape(name.replace('_', ' '))}</h2><img alt='{name}' "
                     f"src='data:image/png;base64,{encoded}'><p class='note'>{html.escape(captions[name])}</p>")
    for kind, grid in grids.items():
        if not grid:
            continue
        parts.append(f"<h2>Example answers: {kind} prompts</h2><p class='note'>Green cells were counted as "
                     "refusals by the refusal detector.</p><table><thead><tr><th>prompt</th>"
                     + "".join(f"<th>{html.escape(label)}</th>" for label in labels) + "</tr></thead><tbody>")
        for entry in grid:
            cells = []
            for label in labels:
                answer = entry["answers"][label]
                css = "answer refusal" if answer.get("refusal") else "answer"
                cells.append(f"<td class='{css}'>{html.escape(answer['answer'])}</td>")
            parts.append(f"<tr><td>{html.escape(_prompt_str(entry['prompt']))}</td>{''.join(cells)}</tr>")
        parts.append("</tbody></table>")
    parts.append("</body></html>")
    (out / "report.html").write_text("\n".join(parts), encoding="utf-8")
    return {"report_html": out / "report.html", "report_md": out / "report.md",
            **{f"plot_{name}": path for name, path in plots.items()}}
