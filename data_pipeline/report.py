"""The preprocessing report: counts by outcome, coverage, storage cost; and the skip listing.

report.json: {read, written, written_per_split, skipped: {reason: count}, repaired: {truncated},
coverage: {vocab_matched_pct, positions_kept_pct, teacher_positions_aligned_pct,
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


class Report:
    def __init__(self, skipped_path: str):
        self.read = 0
        self.written = collections.Counter()
        self.skipped = collections.Counter()
        self.totals = collections.Counter()
        self.skipped_path = skipped_path
        self._skipped_file = open(skipped_path, "w", encoding="utf-8")

    def add(self, result: Result) -> None:
        self.read += 1
        if result.example is not None:
            self.written[result.split] += 1
            self.totals.update(result.stats)
        else:
            self.skipped[result.reason] += 1
            self._skipped_file.write(json.dumps(
                {"file": result.file, "index": result.index, "reason": result.reason,
                 "detail": result.detail}) + "\n")

    def finish(self, out_dir: str, shard_bytes: int, extra: dict) -> dict:
        """Moves the skip listing into `out_dir` and writes report.json there; returns it."""
        self._skipped_file.close()
        written = sum(self.written.values())
        assert self.read == written + sum(self.skipped.values()), (self.read, self.written,
                                                                    self.skipped)
        os.replace(self.skipped_path, os.path.join(out_dir, "skipped.jsonl"))
        t = self.totals
        pct = lambda a, b: round(100.0 * a / b, 3) if b else None  # noqa: E731
        report = {
            "read": self.read,
            "written": written,
            "written_per_split": dict(self.written),
            "skipped": dict(sorted(self.skipped.items())),
            "repaired": {"truncated": t["truncated"]},
            "coverage": {
                "vocab_matched_pct": extra.pop("vocab_matched_pct", None)
                or pct(t["top5_mapped"], t["top5_candidates"]),
                "positions_kept_pct": pct(t["target_positions"], t["response_tokens"]),
                "teacher_positions_aligned_pct": pct(t["target_positions"],
                                                     t["teacher_positions"]),
                "teacher_mass_kept_pct": pct(t["mass_kept"], t["target_positions"]),
            },
            "response_tokens": t["response_tokens"],
            "target_positions": t["target_positions"],
            "bytes_on_disk": shard_bytes,
            "bytes_per_response_token": (round(shard_bytes / t["response_tokens"], 2)
                                         if t["response_tokens"] else None),
            **extra,
        }
        with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        return report
