"""The stored dataset: a TFDS builder writing ArrayRecord shards (no TensorFlow needed).

Record layout (one example = one prompt + response, student tokenization; T = target positions,
k' <= top_k slots per example):
    tokens            int32 [L]       prompt then response ids (L <= --max-length)
    prompt_length     int32 []
    target_mask_bits  uint8 [ceil(L/8)] np.packbits of the bool mask "position has a target"
    teacher_ids       int32 [T, k']   student-vocab ids, log-prob descending (0 in unused slots)
    teacher_logprobs  float32 [T, k'] teacher log-probs at T=1 (-inf in unused slots)
    tail_known        bool []         True: full-vocabulary log-probs (tail = 1 - sum p);
                                      False: renormalised top-5 (tail unknown, treated as 0)
    example_id        text            hex of the hash that also picks the split
Arrays use TFDS's BYTES encoding (raw little-endian) and shards are ArrayRecord with its default
compression, so a response token costs about 8*k' + 4 bytes on disk.

The builder streams: examples arrive from an iterator and go straight to the shard of their split
(a new shard every `SHARD_BYTES`), so memory never grows with the dataset. TFDS prepares into an
`incomplete.*` directory and renames it when done, so a crash never leaves a dataset that looks
complete. Read it back with `open_split` (tfds.builder_from_directory(...).as_data_source).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer, naming
from tensorflow_datasets.core import splits as splits_lib
from tensorflow_datasets.core.utils.lazy_imports_utils import array_record_module

from data_pipeline import codec
from data_pipeline.errors import DataError

NAME = "teacher_targets"
VERSION = "1.0.0"
SPLITS = ("train", "validation")
SHARD_BYTES = 256 << 20
# Metadata key set with num_tokens since it counts tokens: before, the local route stored the
# int32 bytes of the tokens (4 per token) there, Beam the tokens (loader.read_metadata).
NUM_TOKENS_UNIT = "num_tokens_unit"

# The record format (metadata key "record_format"; absent = 1): 1 stores teacher_ids and
# teacher_logprobs as above; 2 (the default) stores them as codec.py encodes them. Both read back
# (open_split) as format 1's arrays.
FORMATS = (1, 2)
_T, _BYTES = tfds.features.Tensor, tfds.features.Encoding.BYTES
_COMMON = {
    "tokens": _T(shape=(None,), dtype=np.int32, encoding=_BYTES),
    "prompt_length": _T(shape=(), dtype=np.int32),
    "target_mask_bits": _T(shape=(None,), dtype=np.uint8, encoding=_BYTES),
    "tail_known": _T(shape=(), dtype=np.bool_),
    "example_id": tfds.features.Text(),
}
FEATURES = {
    1: tfds.features.FeaturesDict({
        **_COMMON,
        "teacher_ids": _T(shape=(None, None), dtype=np.int32, encoding=_BYTES),
        "teacher_logprobs": _T(shape=(None, None), dtype=np.float32, encoding=_BYTES)}),
    2: tfds.features.FeaturesDict({
        **_COMMON,
        "teacher_id_gaps": _T(shape=(None,), dtype=np.uint8, encoding=_BYTES),
        "teacher_q": _T(shape=(None, None), dtype=np.uint8, encoding=_BYTES),
        "teacher_step": _T(shape=(None,), dtype=np.float32, encoding=_BYTES),
        "teacher_logmass": _T(shape=(None,), dtype=np.float32, encoding=_BYTES)}),
}


def target_mask(example: dict) -> np.ndarray:
    """bool [L]: which positions of a stored example have a teacher target."""
    n = len(example["tokens"])
    return np.unpackbits(example["target_mask_bits"], count=n).astype(bool)


def stored(example: dict, record_format: int) -> dict:
    """A converted example (format 1's arrays) -> what the dataset stores in `record_format`."""
    if record_format == 1:
        return example
    example = dict(example)
    example.update(codec.encode(example.pop("teacher_ids"), example.pop("teacher_logprobs")))
    return example


class TeacherTargetsInfo:
    """What both builders share (this one and beam_pipeline's): name, version, features by
    `metadata["record_format"]`, metadata, and no TFDS download chatter."""

    VERSION = tfds.core.Version(VERSION)
    # No checksums/metadata files live next to this code; without this TFDS looks for them via
    # the optional `importlib_resources` package.
    code_path = None

    def _setup(self, metadata: dict) -> None:
        self._metadata, self._format = metadata, metadata.get("record_format", 1)

    # TFDS prints "Downloading and preparing dataset ..." and "... downloaded and prepared"
    # lines; nothing is downloaded here and preprocess prints its own summary.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=__doc__, features=FEATURES[self._format],
            metadata=tfds.core.MetadataDict(self._metadata))


class TeacherTargets(TeacherTargetsInfo, tfds.core.DatasetBuilder):
    """Builds the dataset from `examples()`: an iterator of (split, example dict)."""

    def __init__(self, *, data_dir: str, examples: Callable[[], Iterator[tuple[str, dict]]],
                 metadata: dict, on_complete: Callable[[str, dict[str, int]], None]):
        self._examples, self._on_complete = examples, on_complete
        self._setup(metadata)
        super().__init__(data_dir=data_dir)

    def _download_and_prepare(self, dl_manager, download_config=None):
        del dl_manager, download_config
        features = FEATURES[self._format]
        serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
        writers = {s: _SplitWriter(self.data_dir, self.name, s) for s in SPLITS}
        num_tokens = dict.fromkeys(SPLITS, 0)
        for split, example in self._examples():
            num_tokens[split] += len(example["tokens"])  # tokens, before encoding to bytes
            example = features.encode_example(stored(example, self._format))
            writers[split].write(serializer.serialize_example(example))
        self.info.set_splits(splits_lib.SplitDict([w.close() for w in writers.values()]))
        self.info.metadata["num_tokens"] = num_tokens  # the trainer's step count needs it
        self.info.metadata[NUM_TOKENS_UNIT] = "tokens"
        self._on_complete(self.data_dir, {s: w.count for s, w in writers.items()})

    def _as_dataset(self, *args, **kwargs):
        raise NotImplementedError("read with open_split() / as_data_source(): no TensorFlow here")


class _SplitWriter:
    """Writes one split's serialized examples into numbered ArrayRecord shards."""

    def __init__(self, data_dir: str, name: str, split: str):
        self.template = naming.ShardedFileTemplate(
            data_dir=data_dir, dataset_name=name, split=split, filetype_suffix="array_record")
        self.paths: list[str] = []
        self.lengths: list[int] = []
        self.num_bytes = self.shard_bytes = 0
        self.writer = None

    @property
    def count(self) -> int:
        return sum(self.lengths)

    def write(self, data: bytes) -> None:
        if self.writer is None or self.shard_bytes >= SHARD_BYTES:
            self._close_shard()
            name = f"{self.template.split}-{len(self.paths)}.tmp"
            self.paths.append(os.fspath(self.template.data_dir / name))
            self.writer = array_record_module.ArrayRecordWriter(self.paths[-1], "group_size:1")
            self.lengths.append(0)
            self.shard_bytes = 0
        self.writer.write(data)
        self.lengths[-1] += 1
        self.shard_bytes += len(data)
        self.num_bytes += len(data)

    def _close_shard(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def close(self) -> splits_lib.SplitInfo:
        """Names the shards `<name>-<split>.array_record-0000i-of-0000n` once n is known."""
        self._close_shard()
        for i, path in enumerate(self.paths):
            final = self.template.sharded_filepath(shard_index=i, num_shards=len(self.paths))
            os.rename(path, final)
        return splits_lib.SplitInfo(name=self.template.split, shard_lengths=self.lengths,
                                    num_bytes=self.num_bytes, filename_template=self.template)


def dataset_dir(data_dir: str) -> str:
    """The version directory of the dataset under a `--out` directory (or that directory)."""
    nested = os.path.join(data_dir, NAME, VERSION)
    return nested if os.path.isdir(nested) else data_dir


def _builder(data_dir: str):
    path = dataset_dir(data_dir)
    if not os.path.isfile(os.path.join(path, "dataset_info.json")):
        raise DataError(f"{data_dir} is not a dataset made by `llada-jax preprocess` (no "
                        f"dataset_info.json in {path}); pass a preprocess --out directory")
    return tfds.builder_from_directory(path)


def read_info(data_dir: str) -> tfds.core.DatasetInfo:
    return _builder(data_dir).info


def open_split(data_dir: str, split: str):
    """Random-access source of decoded examples (dicts of numpy arrays, format 1's layout
    whatever the dataset's record format) for one split."""
    builder = _builder(data_dir)
    if split not in builder.info.splits:
        raise DataError(f"{data_dir} has no split {split!r}; it has {sorted(builder.info.splits)}")
    if builder.info.splits[split].num_examples == 0:
        return []
    source = builder.as_data_source(split=split)
    return _Decoded(source) if "teacher_q" in builder.info.features else source


class _Decoded:
    """A format 2 data source read as format 1 examples (len / getitem, as grain wants)."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self):  # the sequence protocol would index past the end (array_record raises)
        return (self[i] for i in range(len(self)))

    def __getitem__(self, index: int) -> dict:
        example = dict(self.source[index])
        example["teacher_ids"], example["teacher_logprobs"] = codec.decode(
            {k: example.pop(k) for k in ("teacher_id_gaps", "teacher_q", "teacher_step",
                                          "teacher_logmass")})
        return example
