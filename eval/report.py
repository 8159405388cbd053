"""Reports: one scored run as JSON + a Markdown table (overall, breakdowns, published numbers beside ours) + a bar
chart PNG of per-category accuracy; and the comparison of two reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Published numbers to read ours against (percent). Bunny-v1.0-3B = bunny-phi-2-siglip (README model zoo); TAP's
# region captioning on VG from its evaluation notebooks (v1.1 checkpoints). TAP-v2's own chat numbers are not in
# our references, so they are not quoted.
PUBLISHED: dict[str, dict[str, Any]] = {
    # Bunny's model card; TAP-v2 paper Table 4 (Phi-2 + LoRA, TAP-L / TAP-XL as the vision encoder)
    "gqa": {"Bunny-v1.0-3B, testdev-balanced": 62.5, "TAPv2-Chat TAP-L": 62.5, "TAPv2-Chat TAP-XL": 62.8},
    "vqav2": {"Bunny-v1.0-3B, test-dev": 79.8, "TAPv2-Chat TAP-L, test-dev": 78.5,
              "TAPv2-Chat TAP-XL, test-dev": 79.0},
    "seed": {"Bunny-v1.0-3B, all": 62.5, "Bunny-v1.0-3B, image": 70.7, "TAPv2-Chat TAP-L": 63.3,
             "TAPv2-Chat TAP-XL": 63.7},
    "mmbench": {"Bunny-v1.0-3B, dev": 68.6, "Bunny-v1.0-3B, test": 69.2, "TAPv2-Chat TAP-L, dev": 59.8,
                "TAPv2-Chat TAP-XL, dev": 60.4},
    "textvqa": {"TAPv2-Chat TAP-L": 47.6, "TAPv2-Chat TAP-XL": 49.0},
    # the official evaluation notebooks (v1.1), and TAP-v2 paper Table 2
    "vg": {"TAP-B v1.1": {"BLEU-4": 12.2, "METEOR": 17.7, "ROUGE-L": 36.0, "CIDEr": 152.3},
           "TAP-L v1.1": {"BLEU-4": 12.4, "METEOR": 17.9, "ROUGE-L": 36.2, "CIDEr": 154.7},
           "TAP-H v1.1": {"BLEU-4": 12.4, "METEOR": 17.8, "ROUGE-L": 36.2, "CIDEr": 154.2},
           "TAPv2-L stage 2 (paper)": {"METEOR": 18.6, "CIDEr": 162.9},
           "TAPv2-XL stage 2 (paper)": {"METEOR": 18.6, "CIDEr": 163.9}},
    "refcocog": {"TAPv2-L stage 2 (paper)": {"METEOR": 19.9, "CIDEr": 99.3},
                 "TAPv2-XL stage 2 (paper)": {"METEOR": 20.0, "CIDEr": 100.2}},
    # TAP-v2 paper Table 1: LVIS v1 val, GT boxes, box AP
    "lvis-cls": {"TAPv2-B SemanticSA-1B": {"AP": 57.4, "APr": 58.6, "APc": 56.8, "APf": 57.5},
                 "TAPv2-L SemanticSA-1B": {"AP": 59.1, "APr": 61.7, "APc": 58.9, "APf": 58.3},
                 "TAPv2-L CaptionSA-400M": {"AP": 65.2, "APr": 66.1, "APc": 65.3, "APf": 64.7},
                 "TAPv2-XL CaptionSA-400M": {"AP": 67.2, "APr": 69.2, "APc": 67.4, "APf": 66.1},
                 "EVA-CLIP-E": {"AP": 64.3, "APr": 72.4, "APc": 65.3, "APf": 59.7}},
    "coco-cls": {},
    # TAP-v2 paper Table 3: ViTDet-H boxes, mask AP
    "coco-seg": {"SAM-H": {"AP": 46.5, "APs": 30.8, "APm": 51.0, "APl": 61.7},
                 "TAPv2-B stage 1": {"AP": 45.1, "APs": 28.7, "APm": 50.1, "APl": 60.6},
                 "TAPv2-L stage 1": {"AP": 46.0, "APs": 29.1, "APm": 50.9, "APl": 62.2},
                 "TAPv2-L stage 2": {"AP": 46.6, "APs": 29.1, "APm": 51.9, "APl": 63.5}},
    "lvis-seg": {"SAM-H": {"AP": 44.7, "APr": 34.6, "APc": 45.5, "APf": 47.8},
                 "TAPv2-B stage 1": {"AP": 42.2, "APr": 33.6, "APc": 43.1, "APf": 45.0},
                 "TAPv2-L stage 1": {"AP": 43.0, "APr": 33.7, "APc": 44.1, "APf": 46.0},
                 "TAPv2-L stage 2": {"AP": 42.9, "APr": 34.1, "APc": 44.0, "APf": 45.7}},
}
# The breakdown drawn in the chart, per benchmark (the first one with several categories otherwise).
CHART = {"gqa": "structural", "seed": "dimension", "mmbench": "category", "vqav2": "answer type"}


def markdown(report: dict[str, Any]) -> str:
    name, lines = report["benchmark"], [f"# {report['benchmark']}: {report.get('model', '')}", ""]
    if "metrics" in report:
        keys = list(report["metrics"])
        lines += ["| | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys),
                  "| ours | " + " | ".join(f"{report['metrics'][k]:.1f}" for k in keys) + " |"]
        for who, numbers in PUBLISHED.get(name, {}).items():
            lines.append(f"| {who} (published) | " + " | ".join(
                f"{numbers[k]:.1f}" if k in numbers else "" for k in keys) + " |")
    else:
        lines += ["| | accuracy | n |", "|---|---:|---:|",
                  f"| **ours, overall** | **{100 * report['accuracy']:.2f}** | {report['scored']} |"]
        lines += [f"| {who} (published) | {value:.1f} | |" for who, value in PUBLISHED.get(name, {}).items()]
        if report.get("measures"):  # rates in percent like accuracy; a lower-is-better score as it is
            lines += ["", "| measure | value | n |", "|---|---:|---:|"]
            lines += [f"| {k} (lower is better) | {m['value']:.4f} | {m['n']} |" if m.get("lower_is_better") else
                      f"| {k} | {100 * m['value']:.2f} | {m['n']} |" for k, m in report["measures"].items()]
        for group, rows in report.get("breakdowns", {}).items():
            lines += ["", f"| {group} | accuracy | n |", "|---|---:|---:|"]
            lines += [f"| {k} | {100 * r['accuracy']:.2f} | {r['n']} |" for k, r in rows.items()]
    extra = {k: report[k] for k in ("coverage", "bad_records", "notes") if report.get(k)}
    if extra.get("coverage", 1) < 1:
        lines += ["", f"Partial run: {100 * extra['coverage']:.1f}% of the questions scored."]
    if extra.get("bad_records"):
        lines += ["", f"Bad records (not answered): {extra['bad_records']}."]
    lines += [f"Note: {n}" for n in extra.get("notes", [])]
    if report.get("rule"):
        lines += ["", f"Rule: {report['rule']}."]
    return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], path: Path) -> bool:
    """Bar chart of the per-category accuracy (or of the caption metrics); False when there is nothing to draw."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if "metrics" in report:
        labels, values, title = list(report["metrics"]), list(report["metrics"].values()), "metrics"
    else:
        groups = report.get("breakdowns", {})
        group = CHART.get(report["benchmark"])
        if group not in groups:
            group = next((g for g, rows in groups.items() if len(rows) > 1), None)
        if group is None:
            return False
        labels = list(groups[group])
        values = [100 * groups[group][k]["accuracy"] for k in labels]
        title = f"accuracy by {group}"
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(labels) + 2), 3.6), dpi=100)
    ax.bar(range(len(labels)), values, color="#4C72B0")
    ax.set_xticks(range(len(labels)), labels, rotation=45 if len(labels) > 4 else 0, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.set_title(f"{report['benchmark']} - {title}", fontsize=10)
    if "metrics" not in report:
        ax.axhline(100 * report["accuracy"], color="#DD8452", linestyle="--", linewidth=1, label="ours, overall")
        for (who, value), colour in zip(PUBLISHED.get(report["benchmark"], {}).items(), ("#55A868", "#8172B3")):
            ax.axhline(value, color=colour, linestyle=":", linewidth=1, label=f"{who} (published)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write(report: dict[str, Any], prefix: str | Path) -> list[Path]:
    """PREFIX.json, PREFIX.md and (when there are categories) PREFIX.png."""
    prefix = Path(prefix)
    if prefix.suffix in (".json", ".md", ".png"):  # `--report out/gqa.json` means the prefix out/gqa
        prefix = prefix.with_suffix("")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    out = [prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".md")]
    out[0].write_text(json.dumps(report, indent=2))
    out[1].write_text(markdown(report))
    png = prefix.with_name(prefix.name + ".png")
    if chart(report, png):
        out.append(png)
    return out


def compare(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Markdown table of two reports of one benchmark: overall and every category, with the difference."""
    if a["benchmark"] != b["benchmark"]:
        raise ValueError(f"cannot compare {a['benchmark']} with {b['benchmark']}")
    head = [f"# {a['benchmark']}: {a.get('model', 'A')} vs {b.get('model', 'B')}", "",
            "| | A | B | B - A |", "|---|---:|---:|---:|"]
    rows = []
    if "metrics" in a:
        rows += [(k, a["metrics"].get(k), b["metrics"].get(k)) for k in dict.fromkeys([*a["metrics"], *b["metrics"]])]
    else:
        rows.append(("overall", 100 * a["accuracy"], 100 * b["accuracy"]))
        for group in dict.fromkeys([*a.get("breakdowns", {}), *b.get("breakdowns", {})]):
            ga, gb = a.get("breakdowns", {}).get(group, {}), b.get("breakdowns", {}).get(group, {})
            for k in dict.fromkeys([*ga, *gb]):
                rows.append((f"{group}: {k}", 100 * ga[k]["accuracy"] if k in ga else None,
                             100 * gb[k]["accuracy"] if k in gb else None))

    def cell(v: float | None) -> str:
        return "" if v is None else f"{v:.2f}"
    body = [f"| {name} | {cell(x)} | {cell(y)} | {cell(y - x) if x is not None and y is not None else ''} |"
            for name, x, y in rows]
    return "\n".join(head + body) + "\n"
