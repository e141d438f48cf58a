"""`preprocess --beam-runner`: the Beam route (DirectRunner, 2 worker processes) writes the local
route's dataset, report and skip listing (needs the [beam] extra)."""

import json
import os

import apache_beam  # noqa: F401  (the [beam] extra: this test needs it installed)
import numpy as np
import pytest
from tokenizers import Tokenizer

from data_pipeline.convert import Options
from data_pipeline.preprocess import preprocess
from tests.helpers import TEXTS, all_examples, make_tokenizers, teacher_record, write_csv, write_json

COUNTED = ("read", "written", "written_per_split", "skipped", "first_skip", "repaired",
           "coverage", "response_tokens", "target_positions")


@pytest.mark.slow
def test_beam_route_equals_local_route(tmp_path):
    tdir, sdir = make_tokenizers(str(tmp_path))
    tok = Tokenizer.from_file(f"{tdir}/tokenizer.json")
    rng = np.random.default_rng(5)
    recs = [teacher_record(tok, f"Q{i}: ", TEXTS[i % 5] + f" #{i}", rng, full=i % 3 != 0)
            for i in range(24)]
    bad = json.loads(json.dumps(recs[4]))
    bad["logits"][0]["full_logits"] = bad["logits"][0]["full_logits"][:10]
    inputs = [write_json(str(tmp_path / "a.json"), recs[:10] + [bad, {"prompt": 1}]),
              write_json(str(tmp_path / "b.jsonl"), recs[10:18] + ["x"], jsonl=True),
              write_csv(tmp_path / "c.csv", recs[18:] + [["p", "r", "[oops"]])]
    opts = Options(sdir, tdir, 96, 8, validation_fraction=0.3)
    local = preprocess(inputs, str(tmp_path / "local"), opts, workers=1)
    beam = preprocess(inputs, str(tmp_path / "beam"), opts, beam_runner="DirectRunner",
                      beam_options="--direct_num_workers 2 --direct_running_mode "
                                   "multi_processing")
    assert local["read"] == 28 and local["written"] == 24
    assert 0 < local["written_per_split"]["validation"] < 24
    for key in COUNTED:
        assert beam[key] == local[key], key
    assert beam["read"] == beam["written"] + sum(beam["skipped"].values())
    assert beam["metadata"] == local["metadata"]
    a, b = all_examples(str(tmp_path / "local")), all_examples(str(tmp_path / "beam"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][0] == b[k][0]  # the same split
        for field in a[k][1]:
            np.testing.assert_array_equal(a[k][1][field], b[k][1][field])
    listing = [open(os.path.join(tmp_path, side, "teacher_targets", "1.0.0", "skipped.jsonl"))
               .read() for side in ("local", "beam")]
    assert listing[0] == listing[1] and listing[0].count("\n") == 4
    saved = json.load(open(tmp_path / "beam" / "teacher_targets" / "1.0.0" / "report.json"))
    assert saved["written"] == 24
