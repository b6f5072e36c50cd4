from typing import Literal

from e911_sip.sip.headscan import Plain, Template, UriParts, ViaParts

def split_head(data: bytes, /) -> tuple[int, str, bytes] | None: ...
def read_plain(
    data: bytes,
    end: int,
    first: str,
    at: bytes,
    template: Template,
    max_headers: int,
    datagram: bool,
    /,
) -> Plain | Literal[False] | None: ...
def lines_of(data: bytes, at: bytes, /) -> list[str]: ...
def line_of(data: bytes, at: bytes, index: int, /) -> str: ...
def pop_first(
    wire: bytes, at: bytes, index: int, first: str, expected: str | None, /
) -> tuple[bytes, bytes] | None: ...
def copy_lines(
    data: bytes,
    at: bytes,
    keys: list[str],
    wanted: frozenset[str],
    head: bytes,
    last: bytes,
    last_key: str,
    /,
) -> tuple[bytes, bytes, list[str]]: ...
def via_parts(text: str, /) -> ViaParts | None: ...
def uri_parts(text: str, /) -> UriParts | None: ...
