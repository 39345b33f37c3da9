"""CBOR from outside, decoded defensively (docs/security.md, "Bytes from outside").

cbor2 by default builds objects from tags (big integers, regexes, dates, shared
references), accepts duplicate map keys, indefinite lengths and trailing bytes. Here
every tag is refused (cbor2 6 decodes its built-in tags without consulting
``tag_hook``, so every tag number is also claimed in ``semantic_decoders`` by a decoder
that refuses it), duplicates and indefinite lengths are refused, nesting is bounded and
all the bytes must be one item. The caller then checks the shape of what came out.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NoReturn

import cbor2


class CBORError(ValueError):
    """The bytes are not one acceptable CBOR item."""


def _refuse(*_args: object) -> NoReturn:
    raise CBORError("CBOR tags are not allowed")


class _EveryTag(Mapping[int, Callable[[Any, bool], Any]]):
    def __getitem__(self, tag: int) -> Callable[[Any, bool], Any]:
        return _refuse

    def __contains__(self, tag: object) -> bool:
        return True

    def __iter__(self) -> Iterator[int]:
        return iter(())

    def __len__(self) -> int:
        return 0


_NO_TAGS = _EveryTag()


def loads(data: bytes, *, max_depth: int = 16) -> Any:
    """One CBOR item from ``data``; CBORError (and nothing else) if it is not one."""
    fp = io.BytesIO(data)
    try:
        obj = cbor2.CBORDecoder(
            fp,
            tag_hook=_refuse,
            semantic_decoders=_NO_TAGS,
            max_depth=max_depth,
            allow_indefinite=False,
            allow_duplicate_keys=False,
        ).decode()
    except Exception as exc:  # cbor2's errors, and anything else: bytes from outside
        raise CBORError(f"not a CBOR item: {exc}") from None
    if fp.tell() != len(data):
        raise CBORError("trailing bytes after the CBOR item")
    return obj


def dumps(obj: Any) -> bytes:
    return cbor2.dumps(obj, canonical=True)
