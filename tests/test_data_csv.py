"""CSV inputs as the original's generator writes them (Python's csv module; columns prompt,
response, logits_data = the JSON text of the seed format's `logits` list)."""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from data_pipeline.convert import Options
from data_pipeline.preprocess import preprocess
from data_pipeline.reader import iter_raw_records
from tests.helpers import TEXTS, all_examples, make_tokenizers, teacher_record, write_csv, write_json


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("csv")
    tdir, sdir = make_tokenizers(str(root))
    tok = Tokenizer.from_file(f"{tdir}/tokenizer.json")
    rng = np.random.default_rng(3)
    # Prompts with newlines, quotes and commas: the quoted fields a CSV row frames around.
    recs = [teacher_record(tok, f'Q{i}, "quoted"\nline two: ', TEXTS[i % 5] + f" #{i}", rng,
                           full=i % 2 == 0) for i in range(8)]
    return root, tdir, sdir, recs


def test_csv_gives_the_json_route_dataset(corpus, tmp_path):
    root, tdir, sdir, recs = corpus
    opts = Options(sdir, tdir, 96, 8, validation_fraction=0.3)
    src_csv = write_csv(tmp_path / "gen.csv", recs)
    via_csv = preprocess([src_csv], str(tmp_path / "csv"), opts, workers=2)
    via_json = preprocess([write_json(str(tmp_path / "gen.json"), recs)], str(tmp_path / "js"),
                          opts)
    assert via_csv["written"] == via_json["written"] == 8
    assert via_csv["coverage"] == via_json["coverage"]
    a, b = all_examples(str(tmp_path / "csv")), all_examples(str(tmp_path / "js"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][0] == b[k][0]
        for f in a[k][1]:
            np.testing.assert_array_equal(a[k][1][f], b[k][1][f])


def test_csv_bad_rows_get_their_reasons(corpus, tmp_path):
    root, tdir, sdir, recs = corpus
    dup = json.loads(json.dumps(recs[1]))
    dup["logits"][1]["position"] = 0
    rows = [recs[0], ["p", "r", "[{not json"], ["only", "two"], dup, recs[2]]
    src = write_csv(tmp_path / "bad.csv", rows)
    with open(src, "a", encoding="utf-8") as f:
        f.write('"p","r","[unterminated\n')  # a truncated last row: its quote never closes
    report = preprocess([src], str(tmp_path / "out"), Options(sdir, tdir, 96, 8))
    assert report["read"] == 6 and report["written"] == 2
    assert report["skipped"] == {"invalid_json": 1, "invalid_csv": 2, "duplicate_positions": 1}
    details = {r.index: r.error for r in iter_raw_records(src, chunk_bytes=64) if r.error}
    assert set(details) == {2, 5} and "quoted field" in details[5]


def test_csv_framing_is_chunk_independent(corpus, tmp_path):
    _, _, _, recs = corpus
    src = write_csv(tmp_path / "gen.csv", recs)
    whole = [r.text for r in iter_raw_records(src)]
    assert [r.text for r in iter_raw_records(src, chunk_bytes=7)] == whole
    for text, rec in zip(whole, recs):
        assert json.loads(text) == {"prompt": rec["prompt"], "response": rec["response"],
                                    "logits": rec["logits"]}


def test_csv_without_the_columns_is_a_user_error(corpus, tmp_path):
    _, tdir, sdir, recs = corpus
    src = write_csv(tmp_path / "x.csv", recs[:1], header=("prompt", "response", "logits"))
    with pytest.raises(ValueError, match=r"x.csv: the CSV header .* lacks \['logits_data'\]"):
        preprocess([src], str(tmp_path / "out"), Options(sdir, tdir, 96, 8))
