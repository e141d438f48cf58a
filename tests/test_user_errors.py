"""What a user trips on (issue 27): a busy workdir, kills, changed inputs into an existing
output, wrong tokenizers, config typos. Each case checks the exit code, the message and that
no traceback is shown; the lock and kill cases run real subprocesses."""

import json
import os
import pathlib
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from llada_jax import cli
from tests.helpers import ROOT, make_dataset, make_tokenizers, random_examples, \
    toy_teacher_records, write_json

ASSETS = ROOT / "llada_jax" / "demo_assets"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("user_errors")), n=24)


def run_cli(argv, capsys):
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert "Traceback" not in output
    return code, output


def env(**changes):
    e = dict(os.environ)
    e.pop("XLA_FLAGS", None)  # one CPU device, as a user's plain run
    e.update(changes)
    return e


def train_cmd(data_dir, workdir, steps=400):
    return [sys.executable, "-m", "llada_jax", "train", "--config", "tiny", "--workdir",
            str(workdir), "--no-progress", f"--config.data.dir={data_dir}",
            "--config.data.seq_len=64", "--config.data.global_batch_size=4",
            f"--config.train.num_steps={steps}", "--config.train.num_epochs=1000",
            "--config.train.log_every=1", "--config.train.checkpoint_every=5",
            "--config.train.eval_every=0"]


def wait_for(path: pathlib.Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def finished_step(workdir: pathlib.Path, step: int) -> pathlib.Path:
    return workdir / "checkpoints" / str(step) / "_CHECKPOINT_METADATA"


# -- train: one run per workdir, kills, Ctrl-C, resume ----------------------------------------

@pytest.mark.slow
def test_second_train_is_refused_and_a_killed_runs_lock_is_taken_over(data_dir, tmp_path):
    first = subprocess.Popen(train_cmd(data_dir, tmp_path, steps=10**6), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env())
    try:
        wait_for(finished_step(tmp_path, 5), first)
        second = subprocess.run(train_cmd(data_dir, tmp_path), capture_output=True, text=True,
                                env=env(), timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"PID {first.pid} on host {socket.gethostname()}" in second.stderr
        assert "is in use by another run" in second.stderr and "Traceback" not in second.stderr
    finally:
        first.kill()
        first.communicate()
    lock_text = json.loads((tmp_path / ".lock").read_text())
    assert lock_text["pid"] == first.pid  # the dead run's lock is still on disk: stale
    last = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()
               and (p / "_CHECKPOINT_METADATA").exists())
    resumed = subprocess.run(train_cmd(data_dir, tmp_path, steps=last + 3), capture_output=True,
                             text=True, env=env(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {last}" in resumed.stdout
    steps = [json.loads(line)["step"] for line in
             (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # Each step once: what the killed run logged after its last checkpoint was replayed.
    assert steps == sorted(set(steps)) and steps[-1] == last + 3 and len(steps) >= last


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_zero(data_dir, tmp_path):
    proc = subprocess.Popen(train_cmd(data_dir, tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env())
    wait_for(finished_step(tmp_path, 5), proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    stopped_at = int(out.split("preempted (SIGINT) at step ")[1].split(";")[0])
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert 5 <= stopped_at < 400 and saved[-1] == stopped_at


def tiny_train(data_dir, workdir, *extra):
    return ["train", "--config", "tiny", "--workdir", workdir, "--no-progress",
            f"--config.data.dir={data_dir}", "--config.data.seq_len=64",
            "--config.train.eval_every=0", *extra]


@pytest.mark.slow
def test_resume_with_another_model_shape_names_the_field(data_dir, tmp_path, capsys):
    code, _ = run_cli(tiny_train(data_dir, tmp_path, "--config.train.num_steps=2",
                                 "--config.train.checkpoint_every=2"), capsys)
    assert code == 0
    code, output = run_cli(tiny_train(data_dir, tmp_path, "--config.train.num_steps=4",
                                      "--config.model.d_model=128"), capsys)
    assert code == 2, output
    assert "this workdir was trained with d_model=64; --config.model.d_model=128 differs" in output
    assert json.loads((tmp_path / "config.json").read_text())["d_model"] == 64  # untouched


@pytest.mark.slow
def test_num_steps_past_the_data_says_where_it_stopped(data_dir, tmp_path, capsys):
    code, output = run_cli(tiny_train(data_dir, tmp_path, "--config.train.num_steps=100",
                                      "--config.train.num_epochs=1",
                                      "--config.train.checkpoint_every=100"), capsys)
    assert code == 0
    assert "the data ran out at step" in output and "of the 100 planned" in output
    assert "--config.train.num_epochs" in output


def test_metrics_logger_drops_the_steps_a_resume_replays(tmp_path):
    from llada_jax.metrics_writer import MetricsLogger

    lines = [json.dumps({"step": s, "split": "train", "loss": s}) for s in range(1, 9)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 9, "spl')  # torn
    logger = MetricsLogger(tmp_path, enabled=True, resume_step=5)
    logger.write(6, {"loss": 60.0})
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[-1]["loss"] == 60.0


# -- train config files ------------------------------------------------------------------------

CONFIG_FILES = {
    "typo_field": ("c.optim.lrr = 1e-3", ["unknown config field 'optim.lrr'; did you mean 'optim.lr'"]),
    "typo_section": ("c.trian = {'num_steps': 3}", ["unknown config field 'trian'; did you mean 'train'"]),
    "syntax": ("c.optim.lr = = 1", ["line 6: invalid syntax"]),
}


@pytest.mark.parametrize("name", sorted(CONFIG_FILES))
def test_config_file_mistakes_are_refused(name, data_dir, tmp_path, capsys):
    body, messages = CONFIG_FILES[name]
    path = tmp_path / f"{name}.py"
    path.write_text("from llada_jax.configs.tiny import get_config as tiny\n\n\n"
                    "def get_config():\n    c = tiny()\n    " + body + "\n    return c\n")
    t = time.perf_counter()
    code, output = run_cli(["train", "--config", path, "--workdir", tmp_path / "w",
                            f"--config.data.dir={data_dir}"], capsys)
    assert code == 2, output
    assert str(path) in output and all(m in output for m in messages), output
    assert time.perf_counter() - t < 10 and not (tmp_path / "w").exists()


def test_a_model_too_large_for_memory_is_refused_before_init(data_dir, tmp_path, capsys):
    code, output = run_cli(["train", "--config", "tiny", "--workdir", tmp_path / "w",
                            f"--config.data.dir={data_dir}", "--config.model.d_model=16384",
                            "--config.model.n_layers=96", "--config.model.mlp_hidden_size=65536"],
                           capsys)
    assert code == 2, output
    assert "B-parameter model" in output and "GiB" in output and "smaller model" in output


# -- preprocess: the inputs belong to the dataset ----------------------------------------------

@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    """Toy tokenizers and three dumps: two with different records, one empty."""
    root = tmp_path_factory.mktemp("dumps")
    tdir, sdir, recs = toy_teacher_records(str(root), random_examples(20, seed=1))
    a = write_json(str(root / "a.jsonl"), recs[:12], jsonl=True)
    b = write_json(str(root / "b.jsonl"), recs[12:], jsonl=True)
    empty = root / "empty.jsonl"
    empty.write_text("")
    return {"a": a, "b": b, "empty": str(empty), "T": tdir, "S": sdir}


def preprocess_argv(dumps, out, *inputs, extra=()):
    return ["preprocess", "--input", *[dumps[i] for i in inputs], "--out", out,
            "--student-tokenizer", dumps["S"], "--teacher-tokenizer", dumps["T"],
            "--max-length", "64", "--top-k", "4", "--workers", "1", *extra]


def test_other_inputs_into_a_finished_dataset_are_refused(dumps, tmp_path, capsys):
    out = tmp_path / "data"
    assert run_cli(preprocess_argv(dumps, out, "a"), capsys)[0] == 0
    assert "reusing the finished dataset" in run_cli(preprocess_argv(dumps, out, "a"), capsys)[1]
    code, output = run_cli(preprocess_argv(dumps, out, "b"), capsys)
    assert code == 2 and "built from other inputs" in output and "b.jsonl" in output
    assert "--overwrite" in output
    code, output = run_cli(preprocess_argv(dumps, out, "b", extra=["--overwrite"]), capsys)
    assert code == 0 and '"written": 8' in output


def test_an_empty_run_leaves_no_finished_dataset(dumps, tmp_path, capsys):
    out = tmp_path / "data"
    code, output = run_cli(preprocess_argv(dumps, out, "empty"), capsys)
    assert code == 1 and "the inputs hold no records" in output
    assert not (out / "teacher_targets" / "1.0.0").exists() and (out / "report.json").is_file()
    code, output = run_cli(preprocess_argv(dumps, out, "a"), capsys)
    assert code == 0 and '"written": 12' in output and "reusing" not in output


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_killed_overwrite_is_put_back_and_its_litter_removed(dumps, tmp_path, capsys):
    out = tmp_path / "data"
    assert run_cli(preprocess_argv(dumps, out, "a"), capsys)[0] == 0
    final = out / "teacher_targets" / "1.0.0"
    pid = _dead_pid()
    final.rename(f"{final}.replaced-{pid}")  # as a kill during --overwrite leaves it
    (out / f".skipped-{pid}.jsonl").write_text("{}\n")
    code, output = run_cli(preprocess_argv(dumps, out, "a"), capsys)
    assert code == 0 and "reusing the finished dataset" in output  # put back, then reused
    assert sorted(p.name for p in (out / "teacher_targets").iterdir()) == ["1.0.0"]
    assert not list(out.glob(".skipped-*"))


def test_num_tokens_counts_tokens_and_older_datasets_read_right(data_dir, tmp_path):
    import shutil

    from data_pipeline import loader, records

    truth = {s: sum(len(ex["tokens"]) for ex in records.open_split(data_dir, s))
             for s in records.SPLITS}
    assert loader.read_metadata(data_dir).num_tokens == truth
    old = tmp_path / "old"  # the same dataset as the local route wrote it before: int32 bytes
    shutil.copytree(records.dataset_dir(data_dir), old)
    meta = json.loads((old / "metadata.json").read_text())
    meta["num_tokens"] = {s: 4 * n for s, n in truth.items()}
    del meta[records.NUM_TOKENS_UNIT]
    (old / "metadata.json").write_text(json.dumps(meta))
    assert loader.read_metadata(str(old)).num_tokens == truth


@pytest.mark.slow
def test_killing_preprocess_takes_its_workers_with_it(dumps, tmp_path):
    psutil = pytest.importorskip("psutil")
    big = tmp_path / "big.jsonl"
    line = pathlib.Path(dumps["a"]).read_text().splitlines()[0] + "\n"
    big.write_text(line * 20000)  # minutes of work for 2 workers
    argv = preprocess_argv({**dumps, "big": str(big)}, tmp_path / "data", "big")
    argv[argv.index("--workers") + 1] = "2"
    log = open(tmp_path / "log", "w")  # not a pipe: orphans holding it open cannot block us
    proc = subprocess.Popen([sys.executable, "-m", "llada_jax", *argv], stdout=log, stderr=log,
                            env=env())
    try:
        deadline = time.time() + 180
        children = []
        while len(children) < 3:  # 2 spawned workers + multiprocessing's resource tracker
            assert proc.poll() is None, (tmp_path / "log").read_text()[-2000:]
            assert time.time() < deadline, "the workers never started"
            children = psutil.Process(proc.pid).children(recursive=True)
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    gone, alive = psutil.wait_procs(children, timeout=15)
    info = [(p.pid, p.status(), p.ppid()) for p in alive]
    for p in alive:
        p.kill()
    assert not alive, info


# -- generate-teacher ---------------------------------------------------------------------------

GEN = ["generate-teacher", "--teacher", ASSETS / "teacher", "--tokenizer",
       ASSETS / "teacher_tokenizer", "--max-new-tokens", "4"]


def test_generate_teacher_refuses_an_existing_out_file(tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    out.write_text("precious\n")
    code, output = run_cli([*GEN, "--prompts", ASSETS / "prompts_eval.txt", "--out", out], capsys)
    assert code == 2 and "already exists; pass --overwrite" in output
    assert out.read_text() == "precious\n"


@pytest.mark.slow
def test_a_killed_generate_teacher_leaves_no_output_file(tmp_path):
    out = tmp_path / "t.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "llada_jax", *map(str, GEN), "--prompts",
                             str(ASSETS / "prompts_train.txt"), "--out", str(out),
                             "--batch-size", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env())
    deadline = time.time() + 300
    while not any(p.stat().st_size for p in tmp_path.glob(".t.jsonl.partial-*")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    proc.kill()
    proc.communicate()
    assert not out.exists()  # a partial file never takes the final name


def test_write_records_failing_midway_leaves_nothing(tmp_path):
    from llada_jax.teacher.seed_format import write_records

    def records():
        yield {"prompt": "a", "response": "b", "logits": []}
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_records(records(), tmp_path / "t.json")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind, content, message", [
    ("folder", None, "is a folder"),
    ("binary", b"\xff\xfe\x00\x81garbage", "is not UTF-8 text"),
    ("blank", b"\n  \n", "no prompts in"),
    ("truncated", b'[{"prompt": "a"}, {"prom', "not valid JSON"),
])
def test_generate_teacher_bad_prompt_files(kind, content, message, tmp_path, capsys):
    path = tmp_path / ("p.json" if kind == "truncated" else "p.txt")
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    code, output = run_cli([*GEN, "--prompts", path, "--out", tmp_path / "t.jsonl"], capsys)
    assert code == 2 and message in output and str(path) in output, output
    assert not (tmp_path / "t.jsonl").exists()


def test_generate_teacher_with_the_students_tokenizer_is_refused(tmp_path, capsys):
    argv = [*GEN, "--prompts", ASSETS / "prompts_eval.txt", "--out", tmp_path / "t.jsonl"]
    argv[argv.index("--tokenizer") + 1] = ASSETS / "student_tokenizer"
    code, output = run_cli(argv, capsys)
    assert code == 2, output
    assert "has 1536 ids but the teacher has vocab_size 2048" in output
    assert not (tmp_path / "t.jsonl").exists()


def test_generate_teacher_records_refuses_other_prompts_into_its_dataset(tmp_path, capsys):
    first, second = tmp_path / "p1.txt", tmp_path / "p2.txt"
    first.write_text("The capital of France is\nTwo plus two is\n")
    second.write_text("A quite different prompt\n")
    argv = [*GEN, "--records", tmp_path / "data", "--student-tokenizer",
            ASSETS / "student_tokenizer", "--max-length", "64", "--top-k", "4",
            "--validation-fraction", "0"]
    assert run_cli([*argv, "--prompts", first], capsys)[0] == 0
    code, output = run_cli([*argv, "--prompts", second], capsys)
    assert code == 2 and "built from other inputs" in output and "--overwrite" in output
    code, output = run_cli([*argv, "--prompts", first, "--max-new-tokens", "3"], capsys)
    assert code == 2 and '"max_new_tokens": 4' in output


# -- speculate, eval: each tokenizer and dataset must be its model's ----------------------------

def test_speculate_with_swapped_tokenizers_is_refused(tmp_path, capsys):
    code, output = run_cli(["speculate", "--drafter", ASSETS / "student", "--teacher",
                            ASSETS / "teacher", "--drafter-tokenizer", ASSETS / "teacher_tokenizer",
                            "--teacher-tokenizer", ASSETS / "student_tokenizer", "--prompts",
                            ASSETS / "prompts_eval.txt", "--max-prompts", "2"], capsys)
    assert code == 2, output
    assert "has 2048 ids but the drafter has vocab_size 1536" in output
    assert "has 1536 ids but the teacher has vocab_size 2048" in output


def test_eval_on_a_dataset_for_another_tokenizer_is_refused(data_dir, capsys):
    from data_pipeline import loader

    vocab = loader.read_metadata(data_dir).student_vocab_size
    code, output = run_cli(["eval", "--ckpt", ASSETS / "student", "--data", data_dir], capsys)
    assert code == 2, output
    assert f"has {vocab} ids but --ckpt {ASSETS / 'student'} has vocab_size 1536" in output


# -- export-hf ----------------------------------------------------------------------------------

def test_export_with_a_tokenizer_only_source_has_the_remote_code_and_0644_files(tmp_path, capsys):
    out = tmp_path / "e"
    old = os.umask(0o022)
    try:
        code, output = run_cli(["export-hf", "--ckpt", ASSETS / "student", "--out", out,
                                "--source-hf-dir", ASSETS / "student_tokenizer"], capsys)
    finally:
        os.umask(old)
    assert code == 0, output
    auto_map = json.loads((out / "config.json").read_text())["auto_map"]
    for ref in auto_map.values():
        assert (out / (ref.rsplit(".", 1)[0] + ".py")).is_file(), ref
    assert (out / "tokenizer.json").is_file()
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert set(modes.values()) == {0o644}, modes
    assert "DESIGN.md" not in (out / "modeling_llada.py").read_text()
    torch = pytest.importorskip("torch")
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)  # loads "either way"
    stored = load_file(out / "model.safetensors")
    name = "model.transformer.wte.weight"
    loaded = dict(model.named_parameters())[name].detach().to(torch.float32).numpy()
    assert (loaded == stored[name].astype("float32")).all()


def test_export_without_a_source_says_what_was_copied(tmp_path, capsys):
    code, output = run_cli(["export-hf", "--ckpt", ASSETS / "student", "--out", tmp_path / "e"],
                           capsys)
    assert code == 0 and "no tokenizer files were copied (the model's remote code was" in output
    assert (tmp_path / "e" / "modeling_llada.py").is_file()


def test_export_with_a_missing_source_writes_nothing(tmp_path, capsys):
    code, output = run_cli(["export-hf", "--ckpt", ASSETS / "student", "--out", tmp_path / "e",
                            "--source-hf-dir", tmp_path / "missing"], capsys)
    assert code == 2 and "--source-hf-dir" in output and "is not a directory" in output
    assert not (tmp_path / "e").exists()


# -- start-up ------------------------------------------------------------------------------------

def test_no_libtpu_noise_on_a_host_without_a_tpu(tmp_path):
    from llada_jax import platforms

    if platforms.tpu_present() or not platforms._installed("libtpu"):
        pytest.skip("needs libtpu installed on a host without a TPU")
    e = env()
    e.pop("JAX_PLATFORMS", None)
    result = subprocess.run([sys.executable, "-m", "llada_jax", "train", "--config", "tiny",
                             "--workdir", str(tmp_path / "w"), "--config.mesh.tensor=3"],
                            capture_output=True, text=True, env=e, timeout=300)
    assert result.returncode == 2 and "does not divide the 1 devices" in result.stderr
    for noise in ("TPU_WORKER_HOSTNAMES", "host bounds", "libtpu"):
        assert noise not in result.stderr, result.stderr


# -- what people read: tables, the train summary, curves ------------------------------------------

@pytest.mark.slow
def test_train_ends_with_a_summary_and_curves_and_eval_with_a_table(data_dir, tmp_path, capsys):
    code, output = run_cli(tiny_train(data_dir, tmp_path, "--config.train.num_steps=2",
                                      "--config.train.checkpoint_every=2",
                                      "--config.train.log_every=1"), capsys)
    assert code == 0
    assert "done at step 2" in output and "last train loss:" in output
    assert f"checkpoint: {tmp_path / 'checkpoints' / '2'}" in output
    assert (tmp_path / "curves.png").stat().st_size > 1000
    code = cli.main(["eval", "--ckpt", str(tmp_path), "--data", data_dir, "--gamma", "2",
                     "--split", "train"])
    captured = capsys.readouterr()
    assert code == 0 and "Traceback" not in captured.err, captured.err[-2000:]
    results = json.loads(captured.out)  # programs still get the JSON
    header, *rows = captured.err.split("offset |")[1].splitlines()
    assert "KL" in header and "α lower" in header and len(rows) >= 2
    first = rows[0].split("|")
    assert float(first[1]) == pytest.approx(results["by_offset"]["kl"][0], abs=1e-3)
    assert "gamma=2: KL" in captured.err


def test_speculate_table_shows_acceptance_and_the_histogram():
    from llada_jax import reports

    summary = {"prompts": 2, "teacher_tokens": 12, "target_calls": 5,
               "tokens_per_target_call": 2.4, "mean_accepted_per_block": 1.4,
               "acceptance_by_offset": [0.8, 0.5, None], "tokens_per_s": 30.0,
               "teacher_only_tokens_per_s": 20.0, "speedup": 1.5, "all_equal_teacher_greedy": True,
               "accepted_length_histogram": reports.accepted_histogram([0, 2, 2, 1, 2])}
    table = reports.speculate_table(summary)
    assert "12 tokens in 5 teacher calls = 2.40 tokens per call" in table
    assert "= 1.50x" in table and "equals the teacher's alone: yes" in table
    assert "     1 |      0.500" in table and "     2 |          -" in table
    assert "       2 |      3  " + "#" * 24 in table  # 3 of 5 blocks accepted 2 drafts
