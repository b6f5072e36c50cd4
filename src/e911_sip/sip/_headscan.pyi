from typing import Literal

from e911_sip.sip.headscan import Plain, Template, ViaParts

def split_head(data: bytes, /) -> tuple[int, str, list[str]] | None: ...
def read_plain(
    data: bytes,
    end: int,
    first: str,
    lines: list[str],
    template: Template,
    max_headers: int,
    datagram: bool,
    /,
) -> Plain | Literal[False] | None: ...
def via_parts(text: str, /) -> ViaParts | None: ...
