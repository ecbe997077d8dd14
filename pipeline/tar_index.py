"""Where a shard's members lie in its tar: DALI's index format (one line per sample, `ext offset
size name` per member, as wds2idx writes it), and the check that an index belongs to its tar.
The packer writes indexes; the torch loader, the stream, fetch and verify read them.
"""

from __future__ import annotations

import os
from pathlib import Path

IDX_VERSION = "v1.2"  # what DALI's wds2idx writes
HEADER = 512  # a tar header's bytes, just before its member's data
NAME = 100  # the header's name field, its first bytes; a longer name has a GNU long-name header of its own first


def index_line(members: list[tuple[str, int, int]]) -> str:
    """One sample's line of a DALI index: `ext offset size name` per member, where offset is where
    the member's data starts and ext is its name after the key's dot."""
    return " ".join(f"{name.split('.', 1)[1]} {offset} {size} {name}" for name, offset, size in members)


def parse_index(path: Path | str, text: str | None = None) -> list[list[tuple[str, int, int]]]:
    """The samples of a DALI index file as lists of (name, offset, size); `text`: its contents,
    when they were read from elsewhere (a store)."""
    name = str(path).rsplit("/", 1)[-1]
    lines = (Path(path).read_text() if text is None else text).splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != IDX_VERSION or not head[1].isdigit() or int(head[1]) != len(lines) - 1:
        raise ValueError(f"{name} is not a {IDX_VERSION} index of {len(lines) - 1} samples")
    samples = []
    for line in lines[1:]:
        f = line.split(" ")
        if len(f) % 4:
            raise ValueError(f"{name} has a malformed line")
        samples.append([(f[i + 3], int(f[i + 1]), int(f[i + 2])) for i in range(0, len(f), 4)])
    return samples


def header_names(header: bytes, name: str) -> bool:
    """Does the tar header just before a member's data (`header`: its first NAME bytes at least)
    carry the member's name? An index of another tar (an older set's) would otherwise mix
    members of different samples. A name longer than the field is not checked."""
    want = name.encode()
    return len(want) > NAME or header[:NAME].rstrip(b"\0") == want


def index_matches(tar: Path, samples: list[list[tuple[str, int, int]]], size: int) -> bool:
    """Every member the index lists lies inside the tar of `size` bytes, behind a header that
    carries its name (header_names)."""
    fd = os.open(tar, os.O_RDONLY)
    try:
        for members in samples:
            for name, offset, n in members:
                if offset < HEADER or offset + n > size or not header_names(os.pread(fd, NAME, offset - HEADER), name):
                    return False
        return True
    finally:
        os.close(fd)
