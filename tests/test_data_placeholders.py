"""--placeholders: the original's markers rewritten to student special tokens, offsets kept exact."""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from data_pipeline import placeholders
from data_pipeline.convert import Converter, Options
from data_pipeline.reader import RawRecord
from tests.helpers import make_tokenizers, teacher_record

MAP = (("<EOS>", "<|eot|>"), ("<eot_id>", "<|eot|>"))


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    tdir, sdir = make_tokenizers(str(tmp_path_factory.mktemp("tok")))
    return tdir, sdir, Tokenizer.from_file(f"{tdir}/tokenizer.json"), Tokenizer.from_file(
        f"{sdir}/tokenizer.json")


def _convert(conv, rec):
    return conv.convert(RawRecord("f", 0, json.dumps(rec).encode()))


def test_teacher_emitted_specials_equals_a_dump_written_with_them(toks):
    tdir, sdir, ttok, _ = toks
    special = "Paris is cold.<|eot|> Snow falls."
    rec = teacher_record(ttok, "<|eot|>Q: ", special, np.random.default_rng(0))
    marked = dict(rec, prompt="<eot_id>Q: ", response="Paris is cold.<EOS> Snow falls.")
    plain = Converter(Options(sdir, tdir, 96, 8))
    rewriting = Converter(Options(sdir, tdir, 96, 8, placeholders=MAP))
    assert _convert(plain, marked).reason == "teacher_tokens_mismatch_response"
    want, got = _convert(plain, rec), _convert(rewriting, marked)
    assert want.reason is None and got.reason is None
    for field in want.example:
        if field != "example_id":
            np.testing.assert_array_equal(got.example[field], want.example[field])
    assert got.stats["with_markers"] == 1 and want.stats["with_markers"] == 0


def test_teacher_saw_markers_as_text_moves_offsets(toks):
    tdir, sdir, ttok, stok = toks
    written = "Paris is cold.<EOS> Snow falls."
    rec = teacher_record(ttok, "Q: ", written, np.random.default_rng(1))
    got = _convert(Converter(Options(sdir, tdir, 96, 8, placeholders=MAP)), rec)
    assert got.reason is None
    ex = got.example
    eot = stok.token_to_id("<|eot|>")
    plen = int(ex["prompt_length"])
    response = ex["tokens"][plen:]
    assert list(response).count(eot) == 1
    # By hand: teacher starts in the written text, moved by +2 after the marker ("<|eot|>" is
    # 2 bytes longer), none at or inside it; student starts in the rewritten text.
    a, b = written.index("<EOS>"), written.index("<EOS>") + 5
    teacher = [s if s < a else s + 2 for s, _ in ttok.encode(written).offsets if not a <= s < b]
    rewritten = written.replace("<EOS>", "<|eot|>")
    enc = stok.encode(rewritten, add_special_tokens=False)
    pieces = [stok.id_to_token(i) for i in enc.ids]
    starts, pos = [], 0
    for p in pieces:  # '▁'-BPE with a dummy prefix: the first '▁' is not in the text
        starts.append(pos - 1 if pos else 0)
        pos += len(p.replace("▁", " ").encode()) if p != "<|eot|>" else len(p)
    expected = np.asarray([s in teacher for s in starts])
    mask = np.unpackbits(ex["target_mask_bits"], count=len(ex["tokens"])).astype(bool)[plen:]
    np.testing.assert_array_equal(mask, expected)
    assert not mask[list(response).index(eot)] and mask[list(response).index(eot) + 1:].any()


def test_presets_map_files_and_errors(toks, tmp_path):
    tdir, sdir, _, _ = toks
    assert dict(placeholders.load_map("llama3"))["<eot_id>"] == "<|eot_id|>"
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"<EOS>": "<|eot|>"}))
    assert placeholders.load_map(str(path)) == (("<EOS>", "<|eot|>"),)
    with pytest.raises(ValueError, match="not a special token of the student tokenizer"):
        Converter(Options(sdir, tdir, 96, 8, placeholders=placeholders.load_map("llama3")))
    path.write_text("[1]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        placeholders.load_map(str(path))
    with pytest.raises(ValueError, match="neither a preset"):
        placeholders.load_map("nope")
