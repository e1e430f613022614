"""Corpus readers: one module per family of formats, found through `registry.READERS`.

A new format is one module (a `base.Reader` subclass: what it sniffs, how it cuts an
input into chunks, how a chunk becomes dialogues with weights and roles) and one line in
the registry. `Corpus` reads many inputs as one stream of records.
"""

from convcli.data.readers.base import (
    CHUNK_BYTES,
    REASONS,
    BadRecord,
    Chunk,
    Dialogue,
    ReadOptions,
    Record,
)
from convcli.data.readers.corpus import Corpus, expand_inputs, parse_chunk
from convcli.data.readers.registry import FORMATS, READERS, detect_format

__all__ = [
    "CHUNK_BYTES",
    "FORMATS",
    "READERS",
    "REASONS",
    "BadRecord",
    "Chunk",
    "Corpus",
    "Dialogue",
    "ReadOptions",
    "Record",
    "detect_format",
    "expand_inputs",
    "parse_chunk",
]
