"""HF LLaDA (or LLaMA) safetensors <-> Flax NNX params, streamed one tensor at a time.

One table (`HF_KEY_RULES`; not the sharding `rules`) names every HF tensor and the stacked Flax param it belongs to: an HF-key
pattern ("{layer}" = block index), the Flax path, and the layout transform (torch Linear weights
are [out, in]; ours are [in..., out...], e.g. q_proj [D, N, hd]); LLAMA_RULES is the same for
LlamaForCausalLM's names, picked by config.json's model_type. Import checks the whole key set
and every shape first and raises one error listing all problems; then it fills each stacked param
layer by layer on the host, places it on devices (with its sharding, given a mesh) and frees the
host copy, so the host never holds the model twice. Export writes the inverse, shard by shard.

    cfg, model = load_hf("path/to/LLaDA-8B-Instruct", dtype="bfloat16")
    logits_blv = model(jnp.asarray([[126080, 42, 126336]]))
    save_hf(model, "out_dir", source_hf_dir="path/to/LLaDA-8B-Instruct")
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import re
import shutil
from collections.abc import Iterator

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from llada_jax import sharding as sharding_lib
from llada_jax.errors import ConversionError
from llada_jax.model.config import DTYPES, ModelConfig
from llada_jax.model.modeling import LLaDAModel

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# The HF remote code written for this project (configuration_llada.py, modeling_llada.py).
HF_REMOTE_CODE = pathlib.Path(__file__).parent / "hf_remote"
# Files of an HF dir that are weights or that export writes itself; everything else is copied.
_NOT_COPIED = re.compile(r".*\.(safetensors|bin|pt|pth|h5|msgpack)$|.*\.index\.json$|config\.json$")
_MAX_LISTED = 50  # problems shown in one error; the count says how many there are


@dataclasses.dataclass(frozen=True)
class KeyRule:
    hf_key: str                  # "{layer}" stands for the block index
    flax_path: tuple[str, ...]
    in_dims: int | None          # Linear: leading Flax dims that are the input; None: same layout


_P = "model.transformer."
HF_KEY_RULES: tuple[KeyRule, ...] = (
    KeyRule(_P + "wte.weight", ("wte",), None),
    KeyRule(_P + "blocks.{layer}.attn_norm.weight", ("layers", "attn_norm"), None),
    KeyRule(_P + "blocks.{layer}.q_proj.weight", ("layers", "q_proj"), 1),
    KeyRule(_P + "blocks.{layer}.k_proj.weight", ("layers", "k_proj"), 1),
    KeyRule(_P + "blocks.{layer}.v_proj.weight", ("layers", "v_proj"), 1),
    KeyRule(_P + "blocks.{layer}.attn_out.weight", ("layers", "attn_out"), 2),
    KeyRule(_P + "blocks.{layer}.ff_norm.weight", ("layers", "ff_norm"), None),
    KeyRule(_P + "blocks.{layer}.ff_proj.weight", ("layers", "ff_proj"), 1),
    KeyRule(_P + "blocks.{layer}.up_proj.weight", ("layers", "up_proj"), 1),
    KeyRule(_P + "blocks.{layer}.ff_out.weight", ("layers", "ff_out"), 1),
    KeyRule(_P + "ln_f.weight", ("ln_f",), None),
    KeyRule(_P + "ff_out.weight", ("ff_out",), 1),
)

# LlamaForCausalLM (modeling_llama.py): q/k are stored in the rotate-half layout our RoPE uses,
# so no permutation; lm_head.weight is absent when tie_word_embeddings is true.
_L = "model.layers.{layer}."
LLAMA_RULES: tuple[KeyRule, ...] = (
    KeyRule("model.embed_tokens.weight", ("wte",), None),
    KeyRule(_L + "input_layernorm.weight", ("layers", "attn_norm"), None),
    KeyRule(_L + "self_attn.q_proj.weight", ("layers", "q_proj"), 1),
    KeyRule(_L + "self_attn.k_proj.weight", ("layers", "k_proj"), 1),
    KeyRule(_L + "self_attn.v_proj.weight", ("layers", "v_proj"), 1),
    KeyRule(_L + "self_attn.o_proj.weight", ("layers", "attn_out"), 2),
    KeyRule(_L + "post_attention_layernorm.weight", ("layers", "ff_norm"), None),
    KeyRule(_L + "mlp.gate_proj.weight", ("layers", "ff_proj"), 1),
    KeyRule(_L + "mlp.up_proj.weight", ("layers", "up_proj"), 1),
    KeyRule(_L + "mlp.down_proj.weight", ("layers", "ff_out"), 1),
    KeyRule("model.norm.weight", ("ln_f",), None),
    KeyRule("lm_head.weight", ("ff_out",), 1),
)
RULES_BY_MODEL_TYPE = {"llada": HF_KEY_RULES, "llama": LLAMA_RULES}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor: where it lives in the Flax params and its HF shape."""
    rule: KeyRule
    layer: int | None
    flax_shape: tuple[int, ...]  # of this tensor's slice (without the 'layers' axis)
    hf_shape: tuple[int, ...]


def to_flax(rule: KeyRule, w: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
    return w if rule.in_dims is None else w.T.reshape(flax_shape)


def to_hf(rule: KeyRule, w: np.ndarray) -> np.ndarray:
    if rule.in_dims is None:
        return w
    return np.ascontiguousarray(w.reshape(math.prod(w.shape[:rule.in_dims]), -1).T)


def _hf_shape(rule: KeyRule, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if rule.in_dims is None:
        return flax_shape
    return (math.prod(flax_shape[rule.in_dims:]), math.prod(flax_shape[:rule.in_dims]))


def abstract_model(cfg: ModelConfig) -> LLaDAModel:
    """The model with ShapeDtypeStruct params (nothing allocated)."""
    return nnx.eval_shape(lambda: LLaDAModel(cfg, rngs=nnx.Rngs(0)))


def hf_layout(cfg: ModelConfig) -> dict[str, Entry]:
    """Every HF tensor name the config implies, in HF order, with its Flax destination."""
    shapes = jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param)))
    layout = {}
    for rule in RULES_BY_MODEL_TYPE[cfg.model_type]:
        node = shapes
        for key in rule.flax_path:
            node = node.get(key) if isinstance(node, dict) else None
        if node is None:  # ff_out with tied embeddings
            continue
        layers = range(cfg.n_layers) if "{layer}" in rule.hf_key else [None]
        shape = tuple(node[1:]) if "{layer}" in rule.hf_key else tuple(node)
        for layer in layers:
            layout[rule.hf_key.format(layer=layer)] = Entry(rule, layer, shape, _hf_shape(rule, shape))
    return layout


class HFReader:
    """Tensor-by-tensor access to an HF dir's safetensors (sharded with an index, or single)."""

    def __init__(self, hf_dir: pathlib.Path, stack: contextlib.ExitStack):
        index = hf_dir / INDEX_NAME
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index} has no \"weight_map\" object; re-download it")
        elif (hf_dir / SINGLE_NAME).is_file():
            weight_map = None
        else:
            raise ConversionError(f"{hf_dir} has neither {INDEX_NAME} nor {SINGLE_NAME}")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_NAME]
        missing = [f for f in files if not (hf_dir / f).is_file()]
        if missing:
            raise ConversionError(f"{index} names shard files that do not exist: {missing}")
        self._handles = {f: stack.enter_context(_open_safetensors(hf_dir / f)) for f in files}
        self.file_of = weight_map or {k: SINGLE_NAME for k in self._handles[SINGLE_NAME].keys()}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.file_of[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._handles[self.file_of[name]].get_slice(name).get_dtype()

    def read(self, name: str) -> np.ndarray:
        try:
            return self._handles[self.file_of[name]].get_tensor(name)
        except Exception as e:  # safetensors raises its own SafetensorError (not exported)
            raise ConversionError(f"{self.file_of[name]}: tensor {name} cannot be read ({e}); "
                                  f"the file is damaged or truncated: re-download it") from None


def _open_safetensors(path: pathlib.Path):
    try:
        return safe_open(path, framework="numpy")
    except Exception as e:  # SafetensorError: a header that does not parse or fit the file
        raise ConversionError(f"{path} is not a readable safetensors file ({e}); it is damaged, "
                              f"truncated or of another format: re-download it") from None


def read_json(path: pathlib.Path) -> dict:
    """A JSON object file; a file that is not one is a ConversionError naming it."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConversionError(f"{path} is not text (binary data); re-download it") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} line {e.lineno}: not valid JSON ({e.msg}); fix or "
                              f"re-download it") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def _check(reader: HFReader, layout: dict[str, Entry], model_type: str) -> list[str]:
    problems = [f"missing tensor {name} (expected shape {list(e.hf_shape)})"
                for name, e in layout.items() if name not in reader.file_of]
    problems += [f"unexpected tensor {name} in {reader.file_of[name]} (not in the {model_type} "
                 f"layout for this config.json)" for name in reader.file_of if name not in layout]
    for name in layout.keys() & reader.file_of.keys():
        shape = reader.shape(name)
        if shape != layout[name].hf_shape:
            problems.append(f"tensor {name} in {reader.file_of[name]} has shape {list(shape)}, "
                            f"config.json implies {list(layout[name].hf_shape)}")
    return problems


def _source_dtype(reader: HFReader, names) -> str:
    found = {reader.dtype(n) for n in names}
    by_st = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
    if len(found) != 1 or not found <= by_st.keys():
        raise ConversionError(f"tensors have dtypes {sorted(found)}; pass a dtype "
                              f"(--dtype {'/'.join(DTYPES)}) to convert them to one")
    return by_st[found.pop()]


def load_hf(hf_dir: str | pathlib.Path, *, mesh: jax.sharding.Mesh | None = None,
            rules: sharding_lib.Rules | None = None, dtype: str | None = None,
            compute_dtype: str | None = None, **run_settings) -> tuple[ModelConfig, LLaDAModel]:
    """An HF LLaDA or LLaMA dir -> (cfg, model). Params keep the file's dtype unless `dtype` is given.

    `mesh` places every param with the sharding its logical axes get under `rules` (default
    sharding.DEFAULT_RULES); `compute_dtype` and `run_settings` (causal, scan_layers,
    remat_policy, attention_impl) set the ModelConfig's run fields.
    """
    if compute_dtype is not None:
        run_settings["dtype"] = compute_dtype
    hf_dir = pathlib.Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir} does not exist or is not a directory; pass an HF LLaDA "
                              f"or LLaMA model directory")
    if not config_path.is_file():
        raise ConversionError(f"{hf_dir} has no config.json; is it an HF LLaDA or LLaMA model directory?")
    cfg = ModelConfig.from_hf_config(read_json(config_path), **run_settings)
    with contextlib.ExitStack() as stack:
        reader = HFReader(hf_dir, stack)
        layout = hf_layout(cfg)
        problems = _check(reader, layout, cfg.model_type)
        if problems:
            shown = problems[:_MAX_LISTED]
            if len(problems) > _MAX_LISTED:
                shown.append(f"... and {len(problems) - _MAX_LISTED} more")
            raise ConversionError(f"{hf_dir}: {len(problems)} problem(s) with the weights:\n  "
                                  + "\n  ".join(shown))
        cfg = cfg.replace(param_dtype=dtype or _source_dtype(reader, layout))
        graphdef, state = nnx.split(abstract_model(cfg))
        shardings = None if mesh is None else nnx.to_pure_dict(sharding_lib.param_shardings(
            state, mesh, rules or sharding_lib.DEFAULT_RULES))
        pure = nnx.to_pure_dict(state)
        for path, entries in _by_param(layout).items():
            host = _fill_host(reader, entries, _get(pure, path), DTYPES[cfg.param_dtype])
            _set(pure, path, _place(host, None if shardings is None else _get(shardings, path)))
            del host
    nnx.replace_by_pure_dict(state, pure)
    return cfg, nnx.merge(graphdef, state)


def _by_param(layout: dict[str, Entry]) -> dict[tuple[str, ...], list[tuple[str, Entry]]]:
    grouped: dict[tuple[str, ...], list[tuple[str, Entry]]] = {}
    for name, entry in layout.items():
        grouped.setdefault(entry.rule.flax_path, []).append((name, entry))
    return grouped


def _fill_host(reader: HFReader, entries, abstract, dtype: np.dtype) -> np.ndarray:
    host = np.empty(abstract.shape, dtype)
    for name, entry in entries:
        value = to_flax(entry.rule, reader.read(name), entry.flax_shape).astype(dtype, copy=False)
        if entry.layer is None:
            host[...] = value
        else:
            host[entry.layer] = value
    return host


def _place(host: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
    if sharding is None:
        return jax.device_put(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    _get(tree, path[:-1])[path[-1]] = value


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000 (HF's max_shard_size convention)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ConversionError(f"bad size {text!r}: write e.g. 5GB, 500MB or 2GiB")
    unit = (match.group(2) or "B").upper()
    power = " KMGT".index(unit[0]) if unit != "B" else 0
    size = int(float(match.group(1)) * (1024 if "I" in unit else 1000) ** power)
    if size < 1:
        raise ConversionError(f"size {text!r} must be at least 1 byte: write e.g. 5GB")
    return size


def save_hf(model: LLaDAModel, out_dir: str | pathlib.Path, *,
            source_hf_dir: str | pathlib.Path | None = None, dtype: str | None = None,
            max_shard_bytes: int = 5 * 10**9) -> list[str]:
    """Writes an HF LLaDA (or LlamaForCausalLM) dir (sharded safetensors + index, config.json); returns the shard names.

    Tensors keep the params' dtype unless `dtype` is given. From `source_hf_dir` every file that is
    not weights or config.json is copied (tokenizer files, remote code *.py, generation config);
    the project's own remote code (`hf_remote/`) fills in any module config.json's auto_map
    names that the source lacks (or all of them, without a source). Either way
    `AutoModel.from_pretrained(out_dir, trust_remote_code=True)` loads the result. Files get
    the permissions the umask gives new files (0644 under umask 022), safetensors included.
    """
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConversionError(f"--out {out_dir} is a file; choose a new output directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConversionError(f"{out_dir} exists and is not empty; choose a new output directory")
    if source_hf_dir is not None and not pathlib.Path(source_hf_dir).is_dir():
        raise ConversionError(f"--source-hf-dir {source_hf_dir} is not a directory")  # before writing
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    out_dtype = DTYPES[dtype or cfg.param_dtype]
    layout = hf_layout(cfg)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    shards = _plan_shards(layout, out_dtype.itemsize, max_shard_bytes)
    names = ([SINGLE_NAME] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for file_name, shard in zip(names, shards):
        tensors = {name: _hf_tensor(params, layout[name], out_dtype) for name in shard}
        save_file(tensors, out_dir / file_name, metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        total = sum(math.prod(e.hf_shape) * out_dtype.itemsize for e in layout.values())
        weight_map = {name: f for f, shard in zip(names, shards) for name in shard}
        (out_dir / INDEX_NAME).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    _write_config(cfg, out_dir, dtype or cfg.param_dtype)
    if source_hf_dir is not None:
        _copy_support_files(pathlib.Path(source_hf_dir), out_dir)
    for module in remote_code_missing(out_dir):  # what auto_map names, from the project's own
        shutil.copy2(HF_REMOTE_CODE / module, out_dir / module)
    _default_permissions(out_dir)
    return names


def remote_code_missing(out_dir: pathlib.Path) -> list[str]:
    """The remote-code files config.json's auto_map names that `out_dir` lacks and hf_remote/
    has (config.json auto_map values look like "modeling_llada.LLaDAModelLM")."""
    auto_map = json.loads((out_dir / "config.json").read_text()).get("auto_map") or {}
    modules = {ref.split("--")[-1].rsplit(".", 1)[0] + ".py"
               for ref in auto_map.values() if isinstance(ref, str)}
    return sorted(m for m in modules if not (out_dir / m).is_file()
                  and (HF_REMOTE_CODE / m).is_file())


def _default_permissions(out_dir: pathlib.Path) -> None:
    """0666 minus the umask for every file (safetensors writes its files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in out_dir.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _plan_shards(layout: dict[str, Entry], itemsize: int, max_bytes: int) -> list[list[str]]:
    shards, size = [[]], 0
    for name, entry in layout.items():
        nbytes = math.prod(entry.hf_shape) * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _hf_tensor(params: dict, entry: Entry, dtype: np.dtype) -> np.ndarray:
    value = _get(params, entry.rule.flax_path)
    if entry.layer is not None:
        value = value[entry.layer]
    return to_hf(entry.rule, np.asarray(jax.device_get(value))).astype(dtype, copy=False)


def _write_config(cfg: ModelConfig, out_dir: pathlib.Path, dtype: str) -> None:
    hf = cfg.to_hf_config()
    for key in ("torch_dtype", "dtype"):  # the weights' dtype, as transformers records it
        if key in hf:
            hf[key] = dtype
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")


def _copy_support_files(source: pathlib.Path, out_dir: pathlib.Path) -> None:
    if not source.is_dir():
        raise ConversionError(f"--source-hf-dir {source} is not a directory")
    for path in sorted(source.iterdir()):
        if path.is_file() and not _NOT_COPIED.fullmatch(path.name):
            shutil.copy2(path, out_dir / path.name)


def iter_hf_tensors(hf_dir: str | pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for every tensor of an HF dir, one at a time (used by tests and tools)."""
    with contextlib.ExitStack() as stack:
        reader = HFReader(pathlib.Path(hf_dir), stack)
        for name in sorted(reader.file_of):
            yield name, reader.read(name)
