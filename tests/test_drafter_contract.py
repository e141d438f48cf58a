"""The drafter's serving contract: `train` records it, `export-hf` carries it, `speculate` takes
its settings as defaults and warns, one line each, when it runs with others."""

import hashlib
import json
import pathlib
import shutil

import numpy as np
import pytest

from data_pipeline import alignment, loader
from llada_jax import drafter_contract
from llada_jax.cli import main
from llada_jax.commands.demo import ASSETS
from llada_jax.errors import CheckpointError
from tests.helpers import make_dataset

ROOT = pathlib.Path(__file__).parents[1]
STUDENT_TOK, TEACHER_TOK = ASSETS / "student_tokenizer", ASSETS / "teacher_tokenizer"


def _sha256(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    data_dir = make_dataset(str(root), n=24)
    workdir = root / "run"
    assert main(["train", "--config", str(ROOT / "configs" / "tiny.py"), "--workdir", str(workdir),
                 f"--config.data.dir={data_dir}", "--config.train.num_steps=1",
                 "--config.train.num_epochs=100", "--config.train.checkpoint_every=1",
                 "--config.train.eval_every=1000", "--config.loss.mask_mode=draft_blocks",
                 "--config.loss.draft_gamma=3", "--config.loss.draft_trailing=2"]) == 0
    return workdir, loader.read_metadata(data_dir).options


def test_train_records_it_and_export_hf_carries_it(workdir, tmp_path):
    workdir, options = workdir
    record = drafter_contract.find(workdir)
    mask_id = json.loads((workdir / "config.json").read_text())["mask_token_id"]
    teacher = alignment.Vocab.from_tokenizer(alignment.load_tokenizer(options["teacher_tokenizer"]))
    student = alignment.Vocab.from_tokenizer(alignment.load_tokenizer(options["student_tokenizer"]))
    table = np.asarray([student.byte_to_id.get(b, -1) if b is not None else -1
                        for b in teacher.id_bytes], "<i4")
    assert (record.gamma, record.trailing_masks, record.steps, record.mask_token_id) == (3, 2, 1, mask_id)
    assert record.teacher_tokenizer == {
        "name": pathlib.Path(options["teacher_tokenizer"]).resolve().name,
        "sha256": _sha256(pathlib.Path(options["teacher_tokenizer"]) / "tokenizer.json")}
    assert record.vocab_map_sha256 == hashlib.sha256(table.tobytes()).hexdigest()
    # A step dir's record is its workdir's; export-hf writes the same record beside the weights.
    step_dir, = (workdir / "checkpoints").iterdir()
    assert drafter_contract.find(step_dir) == record
    assert main(["export-hf", "--ckpt", str(step_dir), "--out", str(tmp_path / "hf")]) == 0
    assert drafter_contract.find(tmp_path / "hf") == record


def _speculate(drafter, tmp_path, *flags) -> dict:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("And the LORD said unto Moses,\n")
    out = tmp_path / "out.json"
    assert main(["speculate", "--drafter", str(drafter), "--teacher", str(ASSETS / "teacher"),
                 "--drafter-tokenizer", str(STUDENT_TOK), "--teacher-tokenizer", str(TEACHER_TOK),
                 "--prompts", str(prompts), "--max-new-tokens", "3", "--out", str(out),
                 *flags]) == 0
    return json.loads(out.read_text())["settings"]


@pytest.fixture(scope="module")
def contracted_drafter(tmp_path_factory):
    """The shipped student with a record: γ 3, 2 trailing masks, another teacher tokenizer."""
    drafter = tmp_path_factory.mktemp("drafter") / "student"
    shutil.copytree(ASSETS / "student", drafter)
    served = drafter_contract.for_training(
        gamma=3, trailing_masks=2, steps=1, mask_token_id=1535,
        student_tokenizer=str(STUDENT_TOK), teacher_tokenizer=str(TEACHER_TOK))
    drafter_contract.write(drafter, drafter_contract.Contract(
        **{**served.__dict__, "teacher_tokenizer": {"name": "other", "sha256": "0" * 64}}))
    return drafter


def test_speculate_takes_the_record_as_defaults_and_warns_about_each_difference(
        contracted_drafter, tmp_path, capsys):
    settings = _speculate(contracted_drafter, tmp_path, "--gamma", "5")
    warnings = [line for line in capsys.readouterr().err.splitlines()
                if line.startswith("speculate: warning")]
    assert (settings["gamma"], settings["trailing_masks"], settings["steps"]) == (5, 2, 1)
    assert warnings == [
        "speculate: warning: --gamma 5: the drafter was trained and measured with 3",
        f"speculate: warning: teacher tokenizer teacher_tokenizer (sha256 "
        f"{_sha256(TEACHER_TOK / 'tokenizer.json')[:12]}) is not the one the drafter was "
        f"trained for (other, sha256 000000000000)"]


def test_a_drafter_without_a_record_serves_with_the_defaults_and_says_nothing(tmp_path, capsys):
    settings = _speculate(ASSETS / "student", tmp_path)
    assert "speculate: warning" not in capsys.readouterr().err
    assert (settings["gamma"], settings["trailing_masks"], settings["steps"]) == (4, 4, 1)


def test_mask_id_and_vocabulary_map_mismatches_are_named():
    record = drafter_contract.Contract(4, 4, 1, 7, None, "a" * 64)
    served = drafter_contract.Contract(4, 4, 1, 8, {"name": "t", "sha256": "b" * 64}, "c" * 64)
    assert drafter_contract.mismatches(record, served) == [
        "mask id 8: the drafter was trained with 7",
        "the teacher -> drafter vocabulary map differs from the one the drafter was trained "
        "with (another tokenizer pair)"]
    assert drafter_contract.mismatches(None, served) == []


def test_a_broken_record_is_a_user_error(tmp_path):
    (tmp_path / drafter_contract.FILE).write_text('{"format": 1, "gamma": 4}')
    with pytest.raises(CheckpointError, match="not a drafter contract.*re-export"):
        drafter_contract.find(tmp_path)
