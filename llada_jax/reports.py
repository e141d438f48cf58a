"""What people read at the end of a run: short tables of eval and speculate results, the train
summary, and the loss / acceptance curves (curves.png). Strings and files only: the commands
print them (the JSON stays on stdout and in --out for programs)."""

from __future__ import annotations

import collections
import json
import pathlib
import sys


def progress(items, desc: str, unit: str, total: int | None = None):
    """`items` with a tqdm bar on stderr when it is a terminal (a log file gets none)."""
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit=unit, total=total, file=sys.stderr, leave=False,
                disable=not sys.stderr.isatty(), dynamic_ncols=True)


def _num(value, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def eval_table(results: dict) -> str:
    """Per drafted offset: KL, α lower / upper, top-1 and scored positions; then E(γ) per γ."""
    by = results["by_offset"]
    lines = ["offset |     KL | α lower | α upper |  top-1 | positions"]
    for j, count in enumerate(results["count_by_offset"]):
        lines.append(f"{j:>6} | {_num(by['kl'][j]):>6} | {_num(by['alpha_lower'][j]):>7} | "
                     f"{_num(by['alpha_upper'][j]):>7} | {_num(by['top1'][j]):>6} | {count:>9.0f}")
    for key in sorted((k for k in results if k.startswith("gamma=")),
                      key=lambda k: int(k.split("=")[1])):
        g = results[key]
        line = (f"{key}: KL {_num(g['kl'])}, α {_num(g['alpha_lower'])}..{_num(g['alpha_upper'])}"
                f", top-1 {_num(g['top1'])}, E(γ) {_num(g['E_lower'], '.2f')}.."
                f"{_num(g['E_upper'], '.2f')} tokens per teacher call")
        measured = [f"measured {m} {_num(g[f'E_measured_{m}'], '.2f')}"
                    for m in ("greedy", "sampled") if g.get(f"E_measured_{m}") is not None]
        lines.append(line + ("; " + ", ".join(measured) if measured else ""))
    return "\n".join(lines)


def speculate_table(summary: dict) -> str:
    """Tokens per teacher call, speed, acceptance by offset and the accepted-length histogram."""
    lines = [f"prompts {summary['prompts']}: {summary['teacher_tokens']} tokens in "
             f"{summary['target_calls']} teacher calls = {summary['tokens_per_target_call']:.2f} "
             f"tokens per call; {summary['mean_accepted_per_block']:.2f} drafts accepted per block",
             f"speed: {summary['tokens_per_s']:.1f} tokens/s vs {summary['teacher_only_tokens_per_s']:.1f}"
             f" teacher alone = {summary['speedup']:.2f}x"]
    if "all_equal_teacher_greedy" in summary:
        lines.append("greedy output equals the teacher's alone: "
                     + ("yes" if summary["all_equal_teacher_greedy"] else "NO"))
    lines.append("offset | acceptance")
    lines += [f"{j:>6} | {_num(rate):>10}" for j, rate in enumerate(summary["acceptance_by_offset"])]
    histogram = summary.get("accepted_length_histogram") or {}
    total = sum(histogram.values()) or 1
    lines.append("accepted | blocks")
    lines += [f"{int(n):>8} | {count:>6}  {'#' * round(40 * count / total)}"
              for n, count in sorted(histogram.items(), key=lambda kv: int(kv[0]))]
    return "\n".join(lines)


def accepted_histogram(accepted: list[int]) -> dict[str, int]:
    """{accepted length: blocks}, keys as strings (JSON)."""
    return {str(n): c for n, c in sorted(collections.Counter(accepted).items())}


def train_summary(workdir: pathlib.Path, last_step: int | None, checkpoint: str | None) -> str:
    """The last logged losses and held-out metrics of metrics.jsonl, and where things are."""
    rows = _metrics(workdir / "metrics.jsonl")
    train = [r for r in rows if r["split"] == "train"]
    evals = _scored_evals(rows)
    lines = [f"llada-jax train: done at step {last_step}"]
    if train:
        tail = train[-3:]
        lines.append("  last train loss: " + ", ".join(f"{r['loss']:.4f} (step {r['step']})"
                                                      for r in tail))
    if evals:
        first, last = evals[0], evals[-1]
        lines.append(f"  held-out KL {first['kl']:.4f} (step {first['step']}) -> {last['kl']:.4f}"
                     f" (step {last['step']}); α upper {first.get('alpha_upper', 0):.3f} -> "
                     f"{last.get('alpha_upper', 0):.3f}")
    lines.append(f"  checkpoint: {checkpoint or 'none'}; metrics: {workdir / 'metrics.jsonl'}; "
                 f"curves: {workdir / 'curves.png'}")
    return "\n".join(lines)


def _scored_evals(rows: list[dict]) -> list[dict]:
    """The held-out rows with metrics (an eval that scored no position logs none)."""
    return [r for r in rows if r["split"] == "eval" and "kl" in r]


def _metrics(path: pathlib.Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def plot_curves(metrics_path: pathlib.Path, png: pathlib.Path) -> None:
    """Train and held-out KL, held-out α lower / upper by step, from a metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _metrics(metrics_path)
    train = [r for r in rows if r["split"] == "train"]
    evals = _scored_evals(rows)
    fig, (ax_loss, ax_alpha) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train KL")
    ax_loss.plot([r["step"] for r in evals], [r["kl"] for r in evals], "o-", label="held-out KL")
    ax_loss.set_xlabel("step")
    ax_loss.set_title("loss")
    ax_loss.legend()
    for key in ("alpha_lower", "alpha_upper"):
        ax_alpha.plot([r["step"] for r in evals], [r[key] for r in evals], "o-", label=key)
    ax_alpha.set_xlabel("step")
    ax_alpha.set_title("held-out acceptance α (γ = 4)")
    ax_alpha.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
