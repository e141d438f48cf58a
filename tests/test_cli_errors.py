"""Every subcommand refuses bad input with exit 2 and a message naming the flag, field or path
and what to do; never a traceback. In-process (cli.main), plus a few real subprocesses."""

import pathlib
import subprocess
import sys

import pytest

from llada_jax import cli
from llada_jax.checkpoints import load_model, save_params
from tests.helpers import make_dataset

ROOT = pathlib.Path(__file__).parents[1]
ASSETS = ROOT / "llada_jax" / "demo_assets"


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Real inputs of every kind: a teacher dump, tokenizers, a dataset, a params checkpoint,
    a train workdir with checkpoints at steps 2 and 4, an HF dir, a prompts file, a plain file."""
    root = tmp_path_factory.mktemp("cli_errors")
    data = make_dataset(str(root), n=24)
    workdir = root / "run"
    code = cli.main(["train", "--config", "tiny", "--workdir", str(workdir), "--no-progress",
                     f"--config.data.dir={data}", "--config.data.seq_len=64",
                     "--config.train.num_steps=4", "--config.train.checkpoint_every=2",
                     "--config.train.eval_every=0", "--config.train.keep_checkpoints=3"])
    assert code == 0
    _, model = load_model(workdir, step=2)
    params = save_params(root / "params", model)
    hf = root / "hf"
    assert cli.main(["export-hf", "--ckpt", str(params), "--out", str(hf)]) == 0
    plain = root / "plain.txt"
    plain.write_text("not a checkpoint\n")
    binary = root / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    truncated = root / "truncated.json"
    truncated.write_text('[{"prompt": "a"}, {"prompt": "b')
    broken_hf, trunc_hf, empty_dir = root / "broken_hf", root / "trunc_hf", root / "empty_dir"
    for d in (broken_hf, trunc_hf, empty_dir):
        d.mkdir()
    (broken_hf / "config.json").write_text('{"d_model": 64,')
    (broken_hf / "model.safetensors").write_bytes(b"")
    (trunc_hf / "config.json").write_bytes((hf / "config.json").read_bytes())
    (trunc_hf / "model.safetensors").write_bytes((hf / "model.safetensors").read_bytes()[:5000])
    syntax = root / "syntax.py"
    syntax.write_text("def get_config(:\n    pass\n")
    return {"ROOT": str(root), "DUMP": str(root / "teacher.jsonl"), "DATA": data,
            "STOK": str(root / "tok" / "student"), "TTOK": str(root / "tok" / "teacher"),
            "PARAMS": str(params), "WORK": str(workdir), "STEP": str(workdir / "checkpoints" / "2"),
            "HF": str(hf), "FILE": str(plain), "PROMPTS": str(ASSETS / "prompts_eval.txt"),
            "TEACHER": str(ASSETS / "teacher"), "TEACHER_TOK": str(ASSETS / "teacher_tokenizer"),
            "STUDENT": str(ASSETS / "student"), "STUDENT_TOK": str(ASSETS / "student_tokenizer"),
            "BIN": str(binary), "TRUNC": str(truncated), "SYNTAX": str(syntax),
            "BROKEN_HF": str(broken_hf), "TRUNC_HF": str(trunc_hf), "EMPTY_DIR": str(empty_dir)}


def expand(argv, paths, tmp_path):
    out = []
    for arg in argv:
        for key, value in paths.items():
            arg = arg.replace(f"<{key}>", value)
        out.append(arg.replace("<TMP>", str(tmp_path)))
    return out


def run_in_process(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse: bad flags
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


PRE = ["preprocess", "--input", "<DUMP>", "--out", "<TMP>/o", "--student-tokenizer", "<STOK>",
       "--teacher-tokenizer", "<TTOK>", "--max-length", "64"]
TRAIN = ["train", "--config", "tiny", "--workdir", "<TMP>/w", "--config.data.dir=<DATA>"]
EVAL = ["eval", "--ckpt", "<WORK>", "--data", "<DATA>"]
GEN = ["generate-teacher", "--teacher", "<TEACHER>", "--tokenizer", "<TEACHER_TOK>", "--prompts",
       "<PROMPTS>", "--out", "<TMP>/t.jsonl"]

CASES = [
    # preprocess
    (["preprocess", "--input", "/nonexistent/x.jsonl", *PRE[3:]], ["'/nonexistent/x.jsonl': no such file"]),
    ([*PRE[:6], "/nonexistent", *PRE[7:]], ["tokenizer '/nonexistent'", "no such file"]),
    ([*PRE, "--top-k", "0"], ["--top-k and --max-length must be positive"]),
    ([*PRE[:-1], "sixty"], ["--max-length", "invalid int value"]),
    ([*PRE, "--bogus"], ["unrecognized arguments: --bogus"]),
    # import-hf
    (["import-hf", "--hf-dir", "/nonexistent", "--out", "<TMP>/c"], ["/nonexistent does not exist or is not a directory"]),
    (["import-hf", "--hf-dir", "<PARAMS>", "--out", "<TMP>/c"], ["has neither model.safetensors.index.json nor model.safetensors"]),
    (["import-hf", "--hf-dir", "<HF>", "--out", "<TMP>/c", "--mesh", "fsdp:2"], ["bad mesh item 'fsdp:2'", "fsdp=4,tensor=2"]),
    (["import-hf", "--hf-dir", "<HF>", "--out", "<TMP>/c", "--mesh", "fsdp=3"], ["does not divide the 8 devices"]),
    (["import-hf", "--hf-dir", "<HF>", "--out", "<PARAMS>"], ["already exists; choose a new checkpoint path"]),
    (["import-hf", "--hf-dir", "<HF>", "--out", "<TMP>/c", "--dtype", "fp8"], ["--dtype", "invalid choice"]),
    # export-hf
    (["export-hf", "--ckpt", "/nonexistent", "--out", "<TMP>/e"], ["/nonexistent does not exist"]),
    (["export-hf", "--ckpt", "<FILE>", "--out", "<TMP>/e"], ["plain.txt is neither", "a workdir checkpoints/"]),
    (["export-hf", "--ckpt", "<PARAMS>", "--step", "2", "--out", "<TMP>/e"], ["--step picks a checkpoint of a train workdir"]),
    (["export-hf", "--ckpt", "<WORK>", "--step", "3", "--out", "<TMP>/e"], ["no checkpoint at step 3; it has [2, 4]"]),
    (["export-hf", "--ckpt", "<WORK>", "--out", "<PARAMS>"], ["exists and is not empty"]),
    (["export-hf", "--ckpt", "<WORK>", "--out", "<TMP>/e", "--max-shard-size", "big"], ["bad size 'big'"]),
    # train: bad config values are refused at load, before data or checkpoints are read
    ([*TRAIN, "--config.loss.mask_mode=prefx_block"], ["loss.mask_mode='prefx_block' is not one of", "prefix_block"]),
    ([*TRAIN, "--config.loss.kind=kld"], ["loss.kind='kld' is not one of"]),
    ([*TRAIN, "--config.loss.chunk_axis=rows"], ["loss.chunk_axis='rows' is not one of"]),
    ([*TRAIN, "--config.model.attention_impl=flash"], ["model.attention_impl='flash' is not one of"]),
    ([*TRAIN, "--config.model.remat_policy=some"], ["model.remat_policy='some' is not one of"]),
    ([*TRAIN, "--config.model.dtype=fp16"], ["model.dtype='fp16' is not one of"]),
    ([*TRAIN, "--config.loss.temperature=0"], ["loss.temperature=0.0 must be > 0"]),
    ([*TRAIN, "--config.mesh.tensor=3"], ["mesh.data/fsdp/tensor", "does not divide the 8 devices"]),
    ([*TRAIN, "--config.mesh.rules=(('batch','pipe'),)"], ["mesh.rules=", "('data', 'fsdp', 'tensor')"]),
    ([*TRAIN, "--config.data.global_batch_size=12"], ["data.global_batch_size=12 must be a multiple", "8 devices"]),
    ([*TRAIN, "--config.data.dir=/nonexistent"], ["data.dir='/nonexistent' is not a `llada-jax preprocess` output"]),
    ([*TRAIN, "--config.model.init=<WORK>"], ["model.init=", "is a train workdir; it must be a params checkpoint"]),
    ([*TRAIN, "--config.model.init=/nonexistent"], ["model.init='/nonexistent'"]),
    (["train", "--config", "tinyy", "--workdir", "<TMP>/w"], ["no shipped config of that name", "llada_8b:v5e_64, llada_8b:v5p_32"]),
    (["train", "--config", "llada_8b:v9", "--workdir", "<TMP>/w"], ["unknown llada_8b variant 'v9'"]),
    (["train", "--config", "/nonexistent.py", "--workdir", "<TMP>/w"], ["config file /nonexistent.py does not exist"]),
    ([*TRAIN, "--config.optim.lr=fast"], ["--config.optim.lr=fast: expected a float"]),
    ([*TRAIN, "--bogus"], ["unrecognised argument '--bogus'"]),
    (["train", "--workdir", "<TMP>/w"], ["the following arguments are required: --config"]),
    # eval
    (["eval", "--ckpt", "/nonexistent", "--data", "<DATA>"], ["/nonexistent does not exist"]),
    (["eval", "--ckpt", "<WORK>", "--data", "/nonexistent"], ["/nonexistent is not a dataset made by `llada-jax preprocess`"]),
    ([*EVAL, "--split", "test"], ["has no split 'test'", "['train', 'validation']"]),
    ([*EVAL, "--gamma", "four"], ["--gamma", "invalid int value"]),
    ([*EVAL, "--batch-size", "0"], ["--batch-size must be at least 1 (got 0)"]),
    ([*EVAL, "--gamma", "4", "0"], ["--gamma must be at least 1 (got 0)"]),
    ([*EVAL, "--seq-len", "0", "--max-batches", "0"], ["--seq-len must be at least 1",
                                                       "--max-batches must be at least 1"]),
    # generate-teacher
    ([*GEN[:4], "/nonexistent", *GEN[5:]], ["--tokenizer /nonexistent is not an HF tokenizer"]),
    (["generate-teacher", "--teacher", "/nonexistent", *GEN[3:]], ["--teacher /nonexistent: /nonexistent does not exist"]),
    ([*GEN[:-1], "<TMP>/t.txt"], ["the name must end in .json or .jsonl"]),
    ([*GEN[:6], "/nonexistent.txt", *GEN[7:]], ["prompts file /nonexistent.txt does not exist"]),
    ([*GEN, "--temperature", "-1"], ["--temperature >= 0"]),
    ([*GEN, "--greedy", "--temperature", "0.5"], ["contradict each other"]),
    # vocabulary mismatch: a tokenizer or dataset that is not the model's
    ([*GEN[:4], "<STUDENT_TOK>", *GEN[5:]], ["has 1536 ids but the teacher has vocab_size 2048"]),
    (["eval", "--ckpt", "<STUDENT>", "--data", "<DATA>"], ["but --ckpt <STUDENT> has vocab_size 1536"]),
    (["speculate", "--drafter", "<STUDENT>", "--teacher", "<TEACHER>", "--drafter-tokenizer",
      "<TEACHER_TOK>", "--teacher-tokenizer", "<STUDENT_TOK>", "--prompts", "<PROMPTS>"],
     ["has 2048 ids but the drafter has vocab_size 1536"]),
    # a causal LLaMA where the LLaDA student belongs
    ([*TRAIN, "--config.model.init=<TEACHER>"], ["model.init=<TEACHER> is a causal LLaMA model; the student must be a LLaDA"]),
    (["eval", "--ckpt", "<TEACHER>", "--data", "<DATA>"], ["--ckpt <TEACHER> is a causal LLaMA model"]),
    (["speculate", "--drafter", "<TEACHER>", "--teacher", "<TEACHER>", "--prompts", "<PROMPTS>"],
     ["--drafter <TEACHER> is a causal LLaMA model"]),
    # binary, truncated or wrong-kind inputs
    ([*GEN[:6], "<BIN>", *GEN[7:]], ["prompts file <BIN> is not UTF-8 text"]),
    ([*GEN[:6], "<TRUNC>", *GEN[7:]], ["<TRUNC>:1: not valid JSON"]),
    ([*GEN[:6], "<ROOT>", *GEN[7:]], ["prompts file <ROOT> is a folder"]),
    (["preprocess", "--input", "<ROOT>", *PRE[3:]], ["--input <ROOT> is a folder"]),
    (["train", "--config", "<SYNTAX>", "--workdir", "<TMP>/w"], ["config file <SYNTAX>, line 1"]),
    # an existing output, or one given as the wrong kind
    ([*GEN[:-1], "<DUMP>"], ["--out <DUMP> already exists; pass --overwrite"]),
    (["export-hf", "--ckpt", "<PARAMS>", "--out", "<TMP>/e", "--source-hf-dir", "/nonexistent"],
     ["--source-hf-dir /nonexistent is not a directory"]),
    (["export-hf", "--ckpt", "<PARAMS>", "--out", "<FILE>"], ["--out <FILE> is a file"]),
    # unwritable outputs, checked before any work
    ([*PRE[:4], "<FILE>/o", *PRE[5:]], ["--out <FILE>/o: <FILE> is a file, not a folder"]),
    (["import-hf", "--hf-dir", "<HF>", "--out", "/proc/llada-out"], ["--out /proc/llada-out: cannot write in /proc"]),
    ([*TRAIN[:4], "<FILE>"], ["--workdir <FILE> is a file; a folder is expected"]),
    ([*EVAL, "--out", "<ROOT>"], ["--out <ROOT> is a folder; a file name is expected"]),
    ([*GEN[:-1], "/proc/llada.jsonl"], ["--out /proc/llada.jsonl: cannot write in /proc"]),
    (["speculate", "--drafter", "<STUDENT>", "--teacher", "<TEACHER>", "--prompts", "<PROMPTS>",
      "--out", "/proc/x.json"], ["--out /proc/x.json: cannot write in /proc"]),
    (["demo", "--out", "/proc/llada-demo"], ["--out /proc/llada-demo: cannot write in /proc"]),
    # broken inputs
    (["import-hf", "--hf-dir", "<BROKEN_HF>", "--out", "<TMP>/c"], ["config.json line 1: not valid JSON"]),
    (["import-hf", "--hf-dir", "<TRUNC_HF>", "--out", "<TMP>/c"], ["model.safetensors is not a readable safetensors file"]),
    ([*PRE[:6], "<BIN>", *PRE[7:]], ["binary.txt' is not a tokenizer.json"]),
    ([*PRE[:6], "<EMPTY_DIR>", *PRE[7:]], ["holds no tokenizer.json nor tokenizer_config.json"]),
    # ranges and flags
    ([*PRE, "--validation-fraction", "2"], ["--validation-fraction 2.0 must be in [0, 1)"]),
    (["export-hf", "--ckpt", "<WORK>", "--out", "<TMP>/e", "--max-shard-size", "0"], ["must be at least 1 byte"]),
    (["demo", "--out", "<TMP>/d", "--compare-strategies", "--seeds", "0"], ["need --seeds >= 1"]),
    (["demo", "--out", "<TMP>/d", "--rows", "original+kl"], ["add that flag"]),
    (["demo", "--out", "<TMP>/d", "--compare-strategies", "--rows", "orignal+kl"], ["unknown --rows ['orignal+kl']"]),
    ([*EVAL, "--seq-len", "8"], ["no response position was scored", "with --seq-len 8"]),
    ([*EVAL, "--bogus"], ["usage: llada-jax eval", "unrecognized arguments: --bogus"]),
    # demo
    (["demo", "--out", "<TMP>/d", "--steps", "0"], ["--steps must be at least 1"]),
    (["demo", "--out", "<TMP>/d", "--mask-mode", "prefx_block"], ["--mask-mode", "invalid choice"]),
    (["demo", "--out", "<FILE>"], ["--out", "plain.txt is a file"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("argv, messages", CASES, ids=[" ".join(c[0][:1] + c[0][-2:]) for c in CASES])
def test_user_errors_exit_2_with_a_message(argv, messages, paths, tmp_path, capsys):
    code, output = run_in_process(expand(argv, paths, tmp_path), capsys)
    assert code == 2, output[-3000:]
    for message in messages:
        assert expand([message], paths, tmp_path)[0] in output
    assert "Traceback" not in output


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", "tiny", "--workdir", "W", "--config.loss.mask_mode=prefx_block"],
     "loss.mask_mode='prefx_block' is not one of"),
    (["export-hf", "--ckpt", "/nonexistent", "--out", "o"], "/nonexistent does not exist"),
    (["preprocess", "--input", "/nonexistent.jsonl", "--out", "o", "--student-tokenizer", "t",
      "--max-length", "8"], "no such file"),
])
def test_user_errors_in_a_real_process(argv, message, tmp_path):
    result = subprocess.run([sys.executable, "-m", "llada_jax", *argv], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "W").exists() and not (tmp_path / "o").exists()  # nothing written


@pytest.mark.slow
def test_export_hf_takes_a_params_checkpoint_a_workdir_its_steps_and_a_step_dir(paths, tmp_path):
    """Each kind exports the params it names, read back from the orbax files independently."""
    import orbax.checkpoint as ocp
    from safetensors.numpy import load_file

    def export(*flags):
        out = tmp_path / f"e{len(list(tmp_path.iterdir()))}"
        assert cli.main(["export-hf", *flags, "--out", str(out)]) == 0
        return load_file(out / "model.safetensors")

    def stored_embedding(step):  # the raw train state, without load_model
        state = ocp.StandardCheckpointer().restore(
            pathlib.Path(paths["WORK"]) / "checkpoints" / str(step) / "state")
        return state["params"]["wte"]["value"]

    key = "model.transformer.wte.weight"
    latest, step2 = export("--ckpt", paths["WORK"]), export("--ckpt", paths["WORK"], "--step", "2")
    step_dir, params = export("--ckpt", paths["STEP"]), export("--ckpt", paths["PARAMS"])
    assert (latest[key] == stored_embedding(4)).all()
    assert (step2[key] == stored_embedding(2)).all()
    assert not (latest[key] == step2[key]).all()  # training moved the params between steps 2 and 4
    for other in (step_dir, params):
        assert other.keys() == step2.keys()
        assert all((other[k] == step2[k]).all() for k in step2)
