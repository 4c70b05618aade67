"""Plot the loss curves of a training run from its metrics.jsonl (one line per logged step).

    python bench/plot_training.py OUT/metrics.jsonl losses.png

One panel per stage, every loss term of that stage against the step, on a log scale (stage I's
CTC starts two orders of magnitude above where it ends); stage III's lambda on its own axis.
Needs matplotlib (`pip install -e ".[train]"`).
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

NOT_CURVES = ("stage", "step", "lambda")


def read_stages(metrics: Path) -> dict[str, list[dict]]:
    stages = defaultdict(list)
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        stages[record["stage"]].append(record)
    return dict(stages)


def plot_stage(axis, name: str, records: list[dict]):
    steps = [r["step"] for r in records]
    for term in (k for k in records[0] if k not in NOT_CURVES):
        axis.plot(steps, [r[term] for r in records], label=term, linewidth=2.0 if term == "loss" else 1.0)
    axis.set_yscale("log")
    axis.set_title(name)
    axis.set_xlabel("step")
    if "lambda" in records[0]:
        weight = axis.twinx()
        weight.plot(steps, [r["lambda"] for r in records], color="grey", linestyle=":", label="lambda")
        weight.set_yscale("log")
        weight.set_ylabel("lambda (dotted)")
    axis.legend(fontsize=7)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", type=Path)
    parser.add_argument("output", type=Path)
    args = parser.parse_args()
    stages = read_stages(args.metrics)
    figure, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 4), squeeze=False)
    for axis, (name, records) in zip(axes[0], sorted(stages.items())):
        plot_stage(axis, name, records)
    axes[0][0].set_ylabel("loss")
    figure.tight_layout()
    figure.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
