"""Turning ``format=`` into one small encode/decode interface over bytes.

A format is anything with ``dumps``/``loads`` (bytes or text) or ``dump``/``load`` (file objects), the same duck
typing as atomic_store 0.0.1 and itsdangerous. Text formats are encoded as UTF-8.
"""

from __future__ import annotations

import io
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import IO, Any, Final

Encoder = Callable[[Any], bytes]
Decoder = Callable[[bytes], Any]


class AbstractFormatFile(ABC):
    """Base for formats that read and write file objects: implement ``dump`` and ``load``."""

    @abstractmethod
    def dump(self, value: Any, fp: IO[Any], **kwargs: Any) -> None:
        """Write ``value`` to ``fp``."""

    @abstractmethod
    def load(self, fp: IO[Any], **kwargs: Any) -> Any:
        """Read a value from ``fp``."""


class AbstractFormatBstr(ABC):
    """Base for formats that turn values into bytes (or str) and back: implement ``dumps`` and ``loads``."""

    @abstractmethod
    def dumps(self, value: Any, **kwargs: Any) -> bytes | str:
        """Return the encoded ``value``."""

    @abstractmethod
    def loads(self, data: bytes | str, **kwargs: Any) -> Any:
        """Return the value decoded from ``data``."""


class Format:
    """A resolved format: ``encode(value) -> bytes`` and ``decode(bytes) -> value``."""

    __slots__ = ("decode", "encode", "name")

    def __init__(self, name: str, encode: Encoder, decode: Decoder) -> None:
        self.name = name
        self.encode = encode
        self.decode = decode

    def __repr__(self) -> str:
        return f"<Format {self.name}>"


_BSON_MISSING: Final = "format='bson' needs the bson module: pip install 'lockstore[bson]' (it installs pymongo's bson)"


def resolve(
    fmt: object,
    *,
    is_binary: bool | None = None,
    load_kwargs: Mapping[str, Any] | None = None,
    dump_kwargs: Mapping[str, Any] | None = None,
) -> Format:
    """Build the :class:`Format` for ``format=``; raises ``TypeError``/``ValueError``/``ImportError`` when unusable."""
    lkw = dict(load_kwargs or {})
    dkw = dict(dump_kwargs or {})
    if fmt is None or fmt == "json":
        return _json(lkw, dkw, is_binary)
    if isinstance(fmt, str):
        if fmt == "pickle":
            import pickle

            fmt = pickle
        elif fmt == "bson":
            try:
                import bson
            except ImportError as exc:
                raise ImportError(_BSON_MISSING) from exc
            fmt = bson
        else:
            raise ValueError(f"unknown format {fmt!r}: use 'json', 'pickle', 'bson' or an object with dumps/loads")
    if isinstance(fmt, type) and issubclass(fmt, (AbstractFormatFile, AbstractFormatBstr)):
        fmt = fmt()
    binary = True if is_binary is None else is_binary
    name = getattr(fmt, "__name__", type(fmt).__name__)
    if callable(getattr(fmt, "dumps", None)) and callable(getattr(fmt, "loads", None)):
        return _from_strings(name, fmt, binary, lkw, dkw)
    if callable(getattr(fmt, "encode", None)) and callable(getattr(fmt, "decode", None)) and name == "bson":
        return _from_strings(name, _BsonAdapter(fmt), binary, lkw, dkw)
    if callable(getattr(fmt, "dump", None)) and callable(getattr(fmt, "load", None)):
        return _from_files(name, fmt, binary, lkw, dkw)
    raise TypeError(f"format {fmt!r} has neither dumps/loads nor dump/load")


def _json(lkw: dict[str, Any], dkw: dict[str, Any], is_binary: bool | None) -> Format:
    # Standard JSON only: NaN and infinities are not JSON (RFC 8259), so reject them unless the caller opts in.
    dkw.setdefault("allow_nan", False)
    if is_binary:
        return _from_strings("json", json, True, lkw, dkw)
    dumps, loads = json.dumps, json.loads
    if not dkw.keys() - {"allow_nan"} and not lkw:
        allow_nan = dkw["allow_nan"]
        encoder = json.JSONEncoder(allow_nan=allow_nan)
        encode = _c_encode(encoder) or (lambda value: encoder.encode(value).encode())

        def decode(data: bytes) -> Any:
            return loads(data.decode())

        return Format("json", encode, decode)
    return Format("json", lambda v: dumps(v, **dkw).encode(), lambda d: loads(d.decode(), **lkw))


def _c_encode(encoder: json.JSONEncoder) -> Encoder | None:
    """``encoder.encode(value).encode()`` without the Python layers around json's C encoder, which cost more than
    encoding a small value: the C encoder is built with the same settings, and a fresh table of the objects being
    encoded (its circular-reference check) at each call, as ``JSONEncoder.iterencode`` does. None without the C
    accelerator, or for settings it does not take."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None or encoder.indent is not None:
        return None
    strings = json.encoder.encode_basestring_ascii if encoder.ensure_ascii else json.encoder.encode_basestring
    settings = (encoder.default, strings, encoder.indent, encoder.key_separator, encoder.item_separator,
                encoder.sort_keys, encoder.skipkeys, encoder.allow_nan)

    def encode(value: Any) -> bytes:
        return "".join(make({}, *settings)(value, 0)).encode()

    return encode


class _BsonAdapter:
    """pymongo's ``bson`` spells dumps/loads as encode/decode."""

    def __init__(self, module: Any) -> None:
        self.dumps = module.encode
        self.loads = module.decode


def _from_strings(name: str, fmt: Any, binary: bool, lkw: dict[str, Any], dkw: dict[str, Any]) -> Format:
    dumps, loads = fmt.dumps, fmt.loads

    def encode(value: Any) -> bytes:
        out = dumps(value, **dkw)
        return out.encode() if isinstance(out, str) else bytes(out)

    if binary:
        return Format(name, encode, lambda data: loads(data, **lkw))
    return Format(name, encode, lambda data: loads(data.decode(), **lkw))


def _from_files(name: str, fmt: Any, binary: bool, lkw: dict[str, Any], dkw: dict[str, Any]) -> Format:
    dump, load = fmt.dump, fmt.load

    def encode(value: Any) -> bytes:
        if binary:
            bio = io.BytesIO()
            dump(value, bio, **dkw)
            return bio.getvalue()
        sio = io.StringIO()
        dump(value, sio, **dkw)
        return sio.getvalue().encode()

    def decode(data: bytes) -> Any:
        return load(io.BytesIO(data) if binary else io.StringIO(data.decode()), **lkw)

    return Format(name, encode, decode)


__all__ = ["AbstractFormatBstr", "AbstractFormatFile", "Format", "resolve"]
