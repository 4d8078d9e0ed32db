"""Source specs: the strings that name a dataset in the config ("mnist",
"fashion_mnist", "glyphs", "folder:<path>", "parquet:<path>", and for the
public pool "shards:<dir>"), parsed and compared without reading any data."""
from __future__ import annotations

from pathlib import Path

from privimage_core.errors import DataError

BUILTIN_PREFIX = {"glyphs": "glyph", "fashion_mnist": "fmnist", "mnist": "mnist"}
SPEC_HELP = ("use mnist, fashion_mnist, glyphs, folder:<path>, parquet:<path> or (public "
             "data only) shards:<dir>")
# Kinds of the public pool read shard by shard, never whole (data/shards.py):
# a directory of Parquet shards, and an ImageFolder (one shard per class).
STREAMED_KINDS = ("shards", "folder")


def parse_spec(spec: str) -> tuple[str, str | None] | None:
    """(kind, path) of a source spec ((kind, None) for a built-in dataset);
    None when ``spec`` is not one (e.g. a plain file path)."""
    kind, _, arg = spec.strip().partition(":")
    if kind in BUILTIN_PREFIX and not arg:
        return kind, None
    if kind in ("folder", "parquet", "shards") and arg:
        return kind, arg
    return None


def parse_or_raise(spec: str) -> tuple[str, str | None]:
    """(kind, path) of a source spec; one clear error when it is not one."""
    parsed = parse_spec(spec)
    if parsed is None:
        raise DataError(f"unknown data source {spec!r}; {SPEC_HELP}")
    return parsed


def source_prefix(spec: str) -> str:
    """Namespace of a source's classes in the public pool: glyph, fmnist,
    mnist, or the folder / file stem for user data."""
    kind, arg = parse_or_raise(spec)
    return BUILTIN_PREFIX[kind] if arg is None else Path(arg.rstrip("/")).stem


def is_user_source(spec: str) -> bool:
    """Sources without a train/test split of their own: user folder:/parquet:
    data (used as given) and glyphs (rendered the same for any split)."""
    kind, arg = parse_or_raise(spec)
    return arg is not None or kind == "glyphs"


def same_dataset(a: str, b: str) -> bool:
    """Same built-in source, or user paths where one contains the other (a
    public folder:/data must not hold a sensitive folder:/data/private)."""
    ka, pa = parse_or_raise(a)
    kb, pb = parse_or_raise(b)
    if (pa is None) != (pb is None):
        return False
    if pa is None:
        return ka == kb
    ra, rb = Path(pa).resolve(), Path(pb).resolve()
    return ra == rb or ra.is_relative_to(rb) or rb.is_relative_to(ra)


def same_user_dataset(a: str, b: str) -> bool:
    """True when two split-less specs (see is_user_source) share files."""
    return is_user_source(a) and is_user_source(b) and same_dataset(a, b)


def is_streamed(spec: str) -> bool:
    """A public source indexed and read shard by shard (STREAMED_KINDS)."""
    return parse_or_raise(spec)[0] in STREAMED_KINDS
