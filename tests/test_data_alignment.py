"""Alignment: token-string normalisation, byte offsets, vocabulary map, position alignment."""

import pathlib

import numpy as np
import pytest
from tokenizers import Tokenizer

from data_pipeline import alignment
from tests.helpers import make_tokenizers


@pytest.fixture(scope="module")
def vocabs(tmp_path_factory):
    tdir, sdir = make_tokenizers(str(tmp_path_factory.mktemp("tok")))
    return tuple(alignment.Vocab.from_tokenizer(alignment.load_tokenizer(p)) for p in (tdir, sdir))


def test_token_bytes_per_scheme():
    assert alignment.token_bytes("ĠParis", "byte_level") == b" Paris"
    assert alignment.token_bytes("Ċ", "byte_level") == b"\n"
    assert alignment.token_bytes("âĺ", "byte_level") == "☃".encode()[:2]
    assert alignment.token_bytes("▁Paris", "sentencepiece") == b" Paris"
    assert alignment.token_bytes("<0xE2>", "sentencepiece") == b"\xe2"
    assert alignment.token_bytes("▁x", "plain") == "▁x".encode()
    assert alignment.token_bytes("☃", "byte_level") is None  # not in the byte alphabet


def test_schemes_detected(vocabs):
    teacher, student = vocabs
    assert (teacher.scheme, student.scheme) == ("byte_level", "sentencepiece")
    assert student.prefix_space and not teacher.prefix_space


@pytest.mark.parametrize("text", ["Paris ☃ is cold", "café\n\tzz", "Zürich"])
def test_encode_starts_are_byte_offsets_of_each_token(vocabs, text):
    raw = text.encode()
    for vocab in vocabs:
        ids, starts = vocab.encode(text)
        pieces = [vocab.id_bytes[i] for i in ids]
        joined = b"".join(pieces)
        lead = 1 if joined == b" " + raw else 0
        expect = np.maximum(np.cumsum([0] + [len(p) for p in pieces[:-1]]) - lead, 0)
        kept = starts >= 0
        np.testing.assert_array_equal(starts[kept], expect[kept])
        assert (~kept).sum() <= lead  # only a bare dummy-prefix token starts nothing


def test_vocab_map_is_exact_byte_equality(vocabs):
    teacher, student = vocabs
    id_map = alignment.vocab_map(teacher, student)
    for t_id, s_id in enumerate(id_map):
        if s_id >= 0:
            assert teacher.id_bytes[t_id] == student.id_bytes[s_id]
        else:
            assert teacher.id_bytes[t_id] not in student.byte_to_id
    # Special tokens share their text, so they map; some byte-level merges have no match.
    assert id_map[teacher.byte_to_id[b"<|eot|>"]] == student.byte_to_id[b"<|eot|>"]
    assert 0.3 < (id_map >= 0).mean() < 1.0


def test_same_tokenizer_is_identity(vocabs):
    teacher, _ = vocabs
    assert alignment.same_vocab(teacher, teacher)
    np.testing.assert_array_equal(alignment.vocab_map(teacher, teacher), np.arange(len(teacher)))


def test_align_positions_only_where_both_start():
    teacher_starts = np.array([0, 3, 5, 9])
    student_starts = np.array([0, 2, 5, -1, 9, 12])
    np.testing.assert_array_equal(alignment.align_positions(teacher_starts, student_starts),
                                  [0, -1, 2, -1, 3, -1])


def test_load_tokenizer_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match="nowhere"):
        alignment.load_tokenizer(str(tmp_path / "nowhere"))
    assert isinstance(alignment.load_tokenizer(make_tokenizers(str(tmp_path))[0]), Tokenizer)


def test_toy_tokenizers_are_the_same_on_every_build(tmp_path):
    """Two builds from the same texts give byte-identical tokenizer files (the student's
    alphabet is cut by frequency with ties broken by code point, not by hash order), and the
    student's 40-character alphabet sends rarer characters through byte fallback."""
    first = make_tokenizers(str(tmp_path / "a"))
    second = make_tokenizers(str(tmp_path / "b"))
    for a, b in zip(first, second):
        assert (pathlib.Path(a, "tokenizer.json").read_bytes()
                == pathlib.Path(b, "tokenizer.json").read_bytes())
    student = Tokenizer.from_file(str(pathlib.Path(first[1], "tokenizer.json")))
    assert student.encode("☃").tokens[-3:] == ["<0xE2>", "<0x98>", "<0x83>"]
