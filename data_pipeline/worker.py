"""The worker side of `preprocess`: each spawned process receives the main process's Converter
(pickled: its vocabularies and id map, without re-reading the tokenizers, which takes seconds
for a 128k vocabulary) and converts the records it is sent, mapping their bytes from the input
file itself. It imports only the conversion modules (not TFDS), so workers start fast."""

from __future__ import annotations

from data_pipeline.convert import Converter, Result
from data_pipeline.reader import RecordSpan

_CONVERTER: Converter | None = None


def init(converter: Converter) -> None:
    global _CONVERTER
    _CONVERTER = converter


def convert(span: RecordSpan) -> Result:
    return _CONVERTER.convert(span.map())
