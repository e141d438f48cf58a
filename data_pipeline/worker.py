"""The worker side of `preprocess`: each spawned process builds one Converter and converts the
records it is sent, reading their bytes from the input file itself. It imports only the
conversion modules (not TFDS), so workers start fast."""

from __future__ import annotations

from data_pipeline.convert import Converter, Options, Result
from data_pipeline.reader import RecordSpan

_CONVERTER: Converter | None = None


def init(opts: Options) -> None:
    global _CONVERTER
    _CONVERTER = Converter(opts)


def convert(span: RecordSpan) -> Result:
    return _CONVERTER.convert(span.read())
