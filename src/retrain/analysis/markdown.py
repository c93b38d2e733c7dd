"""report.md: the numbers, the overrides and the dataset in one page that embeds the plots beside it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # a runtime import would be circular: build imports this module
    from retrain.analysis.report_files import ReportInputs

# Larger class sets list only their weakest classes in the page; per_class.csv always holds all of them.
MAX_CLASS_ROWS = 50
WEAKEST_SHOWN = 15
MAX_BAD_FILES_SHOWN = 20


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def _metrics(inputs: ReportInputs, rows: list[dict[str, Any]]) -> list[str]:
    by_epoch = {row["epoch"]: row for row in inputs.history}
    candidates = [
        ("best epoch", by_epoch.get(inputs.best_epoch)),
        ("last epoch", inputs.history[-1] if inputs.history else None),
    ]
    columns = [(label, row) for label, row in candidates if row is not None]
    if len(columns) == 2 and columns[0][1] is columns[1][1]:
        columns = [("best and last epoch", columns[0][1])]
    lines = ["## Metrics", ""]
    if columns:
        keys = sorted({key for _, row in columns for key in row if key.startswith(("val/", "train/"))})
        header = ["metric", *(f"{label} ({row['epoch']})" for label, row in columns)]
        lines += [*_table(header, [[key, *(row.get(key, "-") for _, row in columns)] for key in keys]), ""]
    after = sorted(inputs.metrics.items())
    if rows:
        after.append((f"{inputs.split} macro F1 ({inputs.weights})", sum(row["f1"] for row in rows) / len(rows)))
        scored = [row for row in rows if row["support"]]  # balanced accuracy: the mean recall of the classes present
        if scored:
            recall = sum(row["recall"] for row in scored) / len(scored)
            after.append((f"{inputs.split} balanced accuracy ({inputs.weights})", recall))
    lines += [*_table(["after training", "value"], [list(item) for item in after]), ""]
    if inputs.monitor:
        lines.append(f"The best epoch is chosen by `{inputs.monitor}`.")
    return lines


def _per_class(inputs: ReportInputs, rows: list[dict[str, Any]]) -> list[str]:
    shown = rows
    intro = f"Scored on the {inputs.split} split ({len(inputs.predictions.labels)} images) with {inputs.weights}."
    if len(rows) > MAX_CLASS_ROWS:
        shown = sorted(rows, key=lambda r: r["f1"])[:WEAKEST_SHOWN]
        intro += f" The {WEAKEST_SHOWN} classes with the lowest F1 (all {len(rows)} are in per_class.csv):"
    table = [[r["class"], r["precision"], r["recall"], r["f1"], r["support"]] for r in shown]
    return [
        "## Where it fails",
        "",
        intro,
        "",
        *_table(["class", "precision", "recall", "F1", "support"], table),
        "",
        "![confusion matrix](confusion_matrix.png)",
        "",
        "The most confident mistakes:",
        "",
        "![top losses](top_losses.png)",
    ]


def _dataset(inputs: ReportInputs) -> list[str]:
    facts = inputs.dataset
    lines = ["## Dataset", ""]
    if facts.get("root"):
        lines.append(f"`{facts['root']}` ({facts.get('layout', '?')} layout), fingerprint `{facts.get('fingerprint')}`")
        lines.append("")
    counts: dict[str, dict[str, int]] = facts.get("class_counts") or {}
    if counts:
        splits = list(counts)
        rows = [[name, *(counts[s].get(name, 0) for s in splits)] for name in inputs.class_names]
        rows.append(["**total**", *(sum(counts[s].values()) for s in splits)])
        lines += [*_table(["class", *splits], rows), ""]
    skipped = inputs.bad_files
    count = len(skipped) or int(facts.get("bad_files") or 0)
    if not count:
        lines.append("Bad files skipped: none.")
        return lines
    lines.append(f"Bad files skipped: {count} (they are listed in the run's bad_files.txt).")
    lines += [f"- `{path}`" for path in skipped[:MAX_BAD_FILES_SHOWN]]
    if len(skipped) > MAX_BAD_FILES_SHOWN:
        lines.append(f"- ... and {len(skipped) - MAX_BAD_FILES_SHOWN} more")
    return lines


def render_markdown(inputs: ReportInputs, rows: list[dict[str, Any]]) -> str:
    """The report page; image links are relative, so the folder can be copied (into the registry) as a whole."""
    overrides = "\n".join(inputs.overrides) if inputs.overrides else "(none: the defaults of conf/train.yaml)"
    lines = [
        f"# {inputs.title}",
        "",
        *_metrics(inputs, rows),
        "",
        "## Training curves",
        "",
        "![training curves](curves.png)",
        "",
        *_per_class(inputs, rows),
        "",
        "## Config overrides",
        "",
        "```",
        overrides,
        "```",
        "",
        *_dataset(inputs),
    ]
    return "\n".join(lines) + "\n"
