"""A drafter's serving contract: the drafting settings it was trained and measured with.

`train` writes it into its workdir and `export-hf` carries it into the HF directory, as
`drafter_contract.json` beside config.json; `speculate` reads it, takes its γ, trailing masks
and steps as defaults, and warns (the CLI prints; this module does not) about each setting it
runs with that differs. A drafter without the file (an export older than the record) serves as
before, with nothing said.

    record = for_training(gamma=4, trailing_masks=4, steps=1, mask_token_id=126336,
                          student_tokenizer=DIR, teacher_tokenizer=DIR)
    write(workdir, record); record = find(path)           # None: no record there
    mismatches(record, served)                             # one line per differing setting

The teacher tokenizer's identity is its name (the directory's) and the SHA-256 of its
tokenizer.json; the vocabulary map is the teacher id -> student id table `preprocess` and
`speculate` build from token bytes (data_pipeline.alignment.vocab_map), hashed. Only hashes
are compared: a tokenizer moved to another directory is the same tokenizer.

A base module (next to checkpoints.py): `train` writes and `speculate` reads it, and neither
may import the other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

from data_pipeline import alignment
from data_pipeline.errors import DataError
from llada_jax.errors import CheckpointError

FILE = "drafter_contract.json"
FORMAT = 1
STEPS_DIR = "checkpoints"  # checkpoints.STEPS_DIR (a step dir's record is its workdir's)


@dataclasses.dataclass(frozen=True)
class Contract:
    gamma: int
    trailing_masks: int
    steps: int
    mask_token_id: int
    teacher_tokenizer: dict | None = None   # {"name": ..., "sha256": ...} of tokenizer.json
    vocab_map_sha256: str | None = None     # None where a tokenizer could not be read


def tokenizer_identity(path: str | pathlib.Path) -> dict | None:
    """{"name", "sha256"} of a tokenizer directory's (or file's) tokenizer.json, or None
    where there is none (a slow tokenizer, a missing path)."""
    path = pathlib.Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        return None
    name = (path if path.is_dir() else path.parent).resolve().name
    return {"name": name, "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}


def vocab_map_sha256(teacher: alignment.Vocab, student: alignment.Vocab) -> str:
    table = alignment.vocab_map(teacher, student).astype("<i4")
    return hashlib.sha256(table.tobytes()).hexdigest()


def for_training(*, gamma: int, trailing_masks: int, steps: int, mask_token_id: int,
                 student_tokenizer: str, teacher_tokenizer: str | None) -> Contract:
    """The record of a drafter trained on `preprocess` data of these tokenizers (teacher None:
    preprocess assumed the student's). Tokenizers that cannot be read (gone since preprocess)
    leave their fields None, which nothing is compared against."""
    teacher_tokenizer = teacher_tokenizer or student_tokenizer
    try:
        vocabs = [alignment.Vocab.from_tokenizer(alignment.load_tokenizer(p))
                  for p in (teacher_tokenizer, student_tokenizer)]
    except (DataError, OSError, ValueError):
        vocabs = None
    return Contract(gamma, trailing_masks, steps, mask_token_id,
                    tokenizer_identity(teacher_tokenizer),
                    vocab_map_sha256(*vocabs) if vocabs else None)


def write(directory: str | pathlib.Path, record: Contract) -> pathlib.Path:
    path = pathlib.Path(directory) / FILE
    path.write_text(json.dumps({"format": FORMAT, **dataclasses.asdict(record)}, indent=2) + "\n")
    return path


def find(path: str | pathlib.Path) -> Contract | None:
    """The record of a drafter at `path` (params checkpoint, workdir, HF dir, or a workdir's
    step dir: its workdir's record), or None if it has none."""
    path = pathlib.Path(path)
    for directory in (path, path.parent.parent if path.parent.name == STEPS_DIR else None):
        if directory is not None and (directory / FILE).is_file():
            return read(directory / FILE)
    return None


def read(file: str | pathlib.Path) -> Contract:
    try:
        raw = json.loads(pathlib.Path(file).read_text())
        version = raw.pop("format")
        if version > FORMAT:
            raise CheckpointError(f"{file} has format {version}, newer than this llada-jax "
                                  f"reads ({FORMAT}): upgrade llada-jax")
        return Contract(**raw)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{file} is not a drafter contract ({err}): delete it, or "
                              f"re-export the drafter") from err


def mismatches(record: Contract | None, served: Contract) -> list[str]:
    """One line per setting `served` runs with that differs from the drafter's `record`
    (nothing without a record, nothing for a field either side does not know)."""
    if record is None:
        return []
    lines = [f"--{name.replace('_', '-')} {getattr(served, name)}: the drafter was trained and "
             f"measured with {getattr(record, name)}"
             for name in ("gamma", "trailing_masks", "steps")
             if getattr(served, name) != getattr(record, name)]
    if served.mask_token_id != record.mask_token_id:
        lines.append(f"mask id {served.mask_token_id}: the drafter was trained with "
                     f"{record.mask_token_id}")
    theirs, ours = record.teacher_tokenizer, served.teacher_tokenizer
    if theirs and ours and theirs["sha256"] != ours["sha256"]:
        lines.append(f"teacher tokenizer {ours['name']} (sha256 {ours['sha256'][:12]}) is not "
                     f"the one the drafter was trained for ({theirs['name']}, sha256 "
                     f"{theirs['sha256'][:12]})")
    if (record.vocab_map_sha256 and served.vocab_map_sha256
            and record.vocab_map_sha256 != served.vocab_map_sha256):
        lines.append("the teacher -> drafter vocabulary map differs from the one the drafter "
                     "was trained with (another tokenizer pair)")
    return lines


def resolve(given: int | None, record: Contract | None, name: str, default: int) -> int:
    """A flag's value: as given, else the record's, else the default."""
    if given is not None:
        return given
    return getattr(record, name) if record is not None else default


def served_contract(*, gamma: int, trailing_masks: int, steps: int, mask_token_id: int,
                    teacher_tokenizer: str, teacher_vocab: alignment.Vocab,
                    student_vocab: alignment.Vocab) -> Contract:
    """What a speculate run serves with, in the record's terms (vocabularies already loaded)."""
    return Contract(gamma, trailing_masks, steps, mask_token_id,
                    tokenizer_identity(teacher_tokenizer),
                    vocab_map_sha256(teacher_vocab, student_vocab))
