"""The preprocessing report: counts by outcome, coverage, storage cost; and the skip listing.

report.json: {read, written, written_per_split, skipped: {reason: count}, first_skip: {reason:
{file, index, detail} of the first record skipped for it}, repaired: {truncated},
written_with_placeholder_markers (records whose prompt or response had a --placeholders
marker), coverage: {vocab_matched_pct, positions_kept_pct, teacher_positions_aligned_pct,
teacher_mass_kept_pct}, bytes_per_response_token, ...}; skipped.jsonl: one {file, index, reason,
detail} per skipped record. `read == written + sum(skipped)` is asserted before anything is saved.

- vocab_matched_pct: share of teacher vocabulary ids whose token has a student token of the same
  bytes (with --teacher-tokenizer), else share of top-5 candidates whose token string maps.
- positions_kept_pct: stored response positions that have a teacher target.
- teacher_positions_aligned_pct: teacher tokens whose start matches a student token start.
- teacher_mass_kept_pct: mean over targets of the teacher probability on mapped student ids.
"""

from __future__ import annotations

import collections
import json
import os

from data_pipeline.convert import Result
from data_pipeline.validate import FIXES, REASONS


def file_order(files: list[str]) -> dict[str, int]:
    """Input file -> its position: with the record index, the input order of a skip."""
    return {f: i for i, f in enumerate(files)}


class Report:
    """The counts of a run, and its skip listing written to `skipped_path` as records come.

    `file_order` (input file -> its position) finds the first skip of each reason in input
    order. Without a path it only counts: the Beam route (beam_pipeline.py) counts per worker and
    `merge`s."""

    def __init__(self, skipped_path: str | None = None, file_order: dict[str, int] | None = None):
        self.read = 0
        self.written = collections.Counter()
        self.skipped = collections.Counter()
        self.first_skip: dict[str, dict] = {}  # reason -> the first record skipped for it
        self.totals = collections.Counter()
        self.tokens = collections.Counter()  # split -> stored tokens (the trainer's step count)
        self.skipped_path = skipped_path
        self.file_order = file_order or {}
        self._skipped_file = open(skipped_path, "w", encoding="utf-8") if skipped_path else None

    def add(self, result: Result) -> None:
        self.read += 1
        if result.example is not None:
            self.written[result.split] += 1
            self.tokens[result.split] += len(result.example["tokens"])
            self.totals.update(result.stats)
        else:
            self.skipped[result.reason] += 1
            entry = {"file": result.file, "index": result.index, "reason": result.reason,
                     "detail": result.detail}
            self._keep_first(entry)
            if self._skipped_file:
                self._skipped_file.write(json.dumps(entry) + "\n")

    def merge(self, other: "Report") -> "Report":
        self.read += other.read
        self.written.update(other.written)
        self.skipped.update(other.skipped)
        self.totals.update(other.totals)
        self.tokens.update(other.tokens)
        for entry in other.first_skip.values():
            self._keep_first(entry)
        return self

    def _keep_first(self, entry: dict) -> None:
        """Keeps the skip that comes first in input order, whatever order they arrive in."""
        mine = self.first_skip.get(entry["reason"])
        if mine is None or self._order(entry) < self._order(mine):
            self.first_skip[entry["reason"]] = entry

    def _order(self, entry: dict) -> tuple[int, int]:
        return self.file_order.get(entry["file"], 0), entry["index"]

    def finish(self, out_dir: str, shard_bytes: int, extra: dict) -> dict:
        """Moves the skip listing into `out_dir` and writes report.json there; returns it."""
        self._skipped_file.close()
        report = self.build(shard_bytes, extra)
        os.replace(self.skipped_path, os.path.join(out_dir, "skipped.jsonl"))
        with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        return report

    def build(self, shard_bytes: int, extra: dict) -> dict:
        """The report.json dict; checks read = written + skipped."""
        written = sum(self.written.values())
        assert self.read == written + sum(self.skipped.values()), (self.read, self.written,
                                                                    self.skipped)
        t = self.totals
        pct = lambda a, b: round(100.0 * a / b, 3) if b else None  # noqa: E731
        report = {
            "read": self.read,
            "written": written,
            "written_per_split": dict(self.written),
            "skipped": dict(sorted(self.skipped.items())),
            "first_skip": dict(sorted(self.first_skip.items())),
            "repaired": {"truncated": t["truncated"]},
            "coverage": {
                "vocab_matched_pct": extra.pop("vocab_matched_pct", None)
                or pct(t["top5_mapped"], t["top5_candidates"]),
                "positions_kept_pct": pct(t["target_positions"], t["response_tokens"]),
                "teacher_positions_aligned_pct": pct(t["target_positions"],
                                                     t["teacher_positions"]),
                "teacher_mass_kept_pct": pct(t["mass_kept"], t["target_positions"]),
            },
            "written_with_placeholder_markers": t["with_markers"],
            "response_tokens": t["response_tokens"],
            "target_positions": t["target_positions"],
            "bytes_on_disk": shard_bytes,
            "bytes_per_response_token": (round(shard_bytes / t["response_tokens"], 2)
                                         if t["response_tokens"] else None),
            **extra,
        }
        return report


def human_summary(report: dict, dataset_dir: str) -> str:
    """What a person reads at the end of a run (stderr): counts, why records were skipped, coverage,
    storage, where the report and the skip listing are; and what to fix when nothing was written."""
    skipped = sum(report["skipped"].values())
    splits = ", ".join(f"{n} {s}" for s, n in sorted(report["written_per_split"].items()) if n)
    lines = [f"preprocess: read {report['read']} records, wrote {report['written']} "
             f"({splits or 'none'}), skipped {skipped}"]
    by_count = sorted(report["skipped"].items(), key=lambda kv: (-kv[1], kv[0]))
    for reason, n in by_count:
        lines.append(f"  skipped {n} as {reason}: {REASONS[reason]}")
    if by_count:
        first = report["first_skip"][by_count[0][0]]
        lines.append(f"  first {by_count[0][0]}: {first['file']} record {first['index']}: "
                     f"{first['detail']}")
    cov = report["coverage"]
    if report["written"]:
        lines.append("  coverage: " + ", ".join(
            f"{name.removesuffix('_pct').replace('_', ' ')} {value:g}%"
            for name, value in cov.items() if value is not None))
        lines.append(f"  storage: {report['bytes_per_response_token']} bytes per response token "
                     f"({report['bytes_on_disk'] / 2**20:.1f} MiB of shards)")
    lines.append(f"  report: {os.path.join(dataset_dir, 'report.json')}; skipped records: "
                 f"{os.path.join(dataset_dir, 'skipped.jsonl')}")
    if not report["written"]:
        reason = by_count[0][0] if by_count else None
        fix = FIXES.get(reason, "see the details in skipped.jsonl")
        lines.append("Nothing was written: " + (
            f"every record was skipped, most as {reason}; {fix}." if reason
            else "the inputs hold no records; check --input."))
    return "\n".join(lines)
