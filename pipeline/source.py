"""Walk datasets in the original layout (zips or folders) and pair every fg_bg with its bg, mask
and depth; check one sample's bytes.

    bg/bg001.jpg
    fg_bg/bg001/bg001_fg001_T_000000.jpg
    fg_bg_masks/bg001/bg001_fg001_T_000000.jpg
    fg_bg_depth/bg001/bg001_fg001_T_000000.jpg
    labels/bg001_label_info.txt          name<TAB>x<TAB>y per line (optional)

The layout may sit under one wrapping folder (`dataset/bg/...`), as zips made by hand usually do.
A sample is found once per fg_bg file; it is either returned or skipped with a reason, never lost.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import sys
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from pipeline.errors import DepthsegError
from pipeline.manifest import ROLES

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
_FOLDER = {"fg_bg": "fg_bg", "mask": "fg_bg_masks", "depth": "fg_bg_depth"}
_LAYOUT = re.compile(r"^(?P<root>(?:[^/]+/)*?)(?P<kind>bg|fg_bg|fg_bg_masks|fg_bg_depth|labels)/(?P<rest>.+)$")
_LOCATOR = struct.Struct("<QQHIB")  # a zip member: header offset, size, method, CRC, encrypted
_KEY_META = re.compile(r"^(?P<bg>bg\d+)_(?P<fg>fg\d+)_(?P<flip>[TF])_(?P<n>\d+)$")
EXPECTED = ("a zip or folder holding fg_bg/<bg>/<name>.jpg with fg_bg_masks/, fg_bg_depth/ and bg/ "
            "beside it (see shards/README.md)")


class SourceError(DepthsegError):
    """A source that cannot be used at all; the message is one sentence for the user."""


class BadSample(DepthsegError):
    """One sample that cannot be packed; the message is the reason."""


class Source:
    """One zip or folder. `entries()` lists (name, locator); `read(locator)` returns the bytes.
    A zip's locator says where the member lies, so a worker reads it with one seek instead of
    parsing the central directory again (seconds for a million entries)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        if os.path.isdir(self.path):
            self.kind = "folder"
        elif not os.path.exists(self.path):
            raise SourceError(f"{self.path} does not exist; expected {EXPECTED}.")
        elif zipfile.is_zipfile(self.path):
            self.kind = "zip"
        else:
            raise SourceError(f"{self.path} is neither a folder nor a zip file; expected {EXPECTED}.")
        self._file = None

    def __getstate__(self):
        return {"path": self.path, "kind": self.kind, "_file": None}

    def entries(self):
        """(name with '/' separators, locator) for every file."""
        if self.kind == "folder":
            root = Path(self.path)
            for p in root.rglob("*"):
                if p.is_file():
                    name = p.relative_to(root).as_posix()
                    yield name, name
            return
        try:
            with zipfile.ZipFile(self.path) as zf:
                infos = zf.infolist()
            del zf  # its name table would keep every ZipInfo alive
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise SourceError(f"{self.path} is a damaged zip file ({e}).") from None
        infos.reverse()
        while infos:  # pop as we go: a million ZipInfo objects take most of a GB
            i = infos.pop()
            if not i.is_dir():
                yield i.filename, _LOCATOR.pack(i.header_offset, i.compress_size, i.compress_type, i.CRC, i.flag_bits & 1)

    def read(self, locator) -> bytes:
        if self.kind == "folder":
            with open(os.path.join(self.path, locator), "rb") as f:
                return f.read()
        if self._file is None:
            self._file = open(self.path, "rb")
        return _read_member(self._file, *_LOCATOR.unpack(locator))

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


def _read_member(f, offset: int, size: int, method: int, crc: int, encrypted: int) -> bytes:
    """One zip member's bytes from its local header on, CRC-checked as zipfile would."""
    if encrypted:
        raise zipfile.BadZipFile("the member is encrypted")
    f.seek(offset)
    head = f.read(30)
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile("bad local file header")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    f.seek(offset + 30 + name_len + extra_len)
    data = f.read(size)
    if method == zipfile.ZIP_DEFLATED:
        data = zlib.decompress(data, -15)
    elif method != zipfile.ZIP_STORED:
        raise zipfile.BadZipFile(f"compression method {method} is not supported (use stored or deflate)")
    if zlib.crc32(data) != crc:
        raise zipfile.BadZipFile("CRC check failed")
    return data


@dataclass(slots=True)
class Sample:
    """One quadruple, kept small: a 400k-sample scan holds 400k of these."""

    key: str
    refs: tuple  # (source index, locator) for bg, fg_bg, mask, depth, in ROLES order
    meta: bytes  # the `<key>.json` member


@dataclass
class Scan:
    samples: list[Sample]
    skipped: list[tuple[str, str]]  # (key, reason)
    ignored: Counter = field(default_factory=Counter)  # junk entries by kind

    @property
    def found(self) -> int:
        return len(self.samples) + len(self.skipped)


def _is_junk(name: str) -> bool:
    parts = name.split("/")
    return parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts) or parts[-1] == "Thumbs.db"


def _split_ext(filename: str) -> tuple[str, str]:
    stem, ext = os.path.splitext(filename)
    return stem, ext.lower()


def make_key(stem: str) -> str:
    """WebDataset splits a key from its extension at the first dot, so keys hold none."""
    return stem.replace(".", "_")


def scan(sources: list[Source]) -> Scan:
    """Pair the entries of all sources into samples; a bg may live in another source than its
    fg_bg (the original set is split over several zips)."""
    images: dict[str, tuple[int, object]] = {}  # mask and depth by name without extension
    bgs: dict[str, tuple[int, object]] = {}  # folder name -> ref, any root
    labels: list[tuple[int, object]] = []
    fg_bgs: list[tuple[str, str, str, int, str, object]] = []  # (root, folder, stem, src, name, locator)
    ignored: Counter = Counter()
    for si, src in enumerate(sources):
        for name, loc in src.entries():
            if _is_junk(name):
                ignored["junk (__MACOSX, hidden files)"] += 1
                continue
            m = _LAYOUT.match(name)
            stem, ext = _split_ext(name.rsplit("/", 1)[-1])
            if not m:
                ignored["outside the layout"] += 1
                continue
            root, kind, rest = sys.intern(m["root"]), m["kind"], m["rest"]
            if kind == "labels":
                if ext == ".txt":
                    labels.append((si, loc))
                continue
            if ext not in IMAGE_EXTS:
                ignored["not .jpg/.jpeg/.png"] += 1
                continue
            if kind == "bg":
                bgs.setdefault(stem, (si, loc))
                continue
            parts = rest.split("/")
            if len(parts) != 2:
                ignored["outside the layout"] += 1
                continue
            folder = sys.intern(parts[0])  # shared by thousands of names
            if kind == "fg_bg":
                fg_bgs.append((root, folder, stem, si, name, loc))
            else:
                images[f"{root}{kind}/{folder}/{stem}"] = (si, loc)
    if not fg_bgs:
        where = ", ".join(s.path for s in sources)
        raise SourceError(f"{where} holds no fg_bg images; expected {EXPECTED}.")
    positions = _read_labels(sources, labels)
    return _pair(fg_bgs, images, bgs, positions, sources, ignored)


def _pair(fg_bgs, images, bgs, positions, sources, ignored) -> Scan:
    samples, skipped, seen = [], [], {}
    for root, folder, stem, si, name, loc in fg_bgs:
        key = make_key(stem)
        if key in seen:
            skipped.append((key, f"duplicate key: {name} in {sources[si].path} repeats {seen[key]}"))
            continue
        seen[key] = name
        refs = (bgs.get(folder), (si, loc), images.pop(f"{root}fg_bg_masks/{folder}/{stem}", None),
                images.pop(f"{root}fg_bg_depth/{folder}/{stem}", None))
        missing = [role for role, ref in zip(ROLES, refs) if ref is None]
        if missing:
            what = {"bg": f"bg/{folder}.jpg", "mask": "its mask", "depth": "its depth map"}
            skipped.append((key, "missing " + " and ".join(what[r] for r in missing)))
            continue
        meta = {"bg": folder, "source": os.path.basename(sources[si].path)}
        km = _KEY_META.match(stem)
        if km:
            meta.update(fg=km["fg"], flip=km["flip"] == "T")
        if stem in positions:
            meta["x"], meta["y"] = positions[stem]
        samples.append(Sample(key, refs, json.dumps(meta).encode()))
    return Scan(samples, skipped, ignored)


def _read_labels(sources, labels) -> dict[str, tuple[int, int]]:
    """labels/<bg>_label_info.txt: `name<TAB>x<TAB>y`; unreadable lines are ignored (optional data)."""
    positions = {}
    for si, loc in labels:
        text = sources[si].read(loc).decode("utf-8", "replace")
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1].lstrip("-").isdigit() and parts[2].lstrip("-").isdigit():
                positions[_split_ext(parts[0])[0]] = (int(parts[1]), int(parts[2]))
    return positions


# --- checking one sample's bytes -------------------------------------------------------------

def image_format(data: bytes) -> str | None:
    """'jpg' or 'png' by magic number, None for anything else."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return None


def check_image(data: bytes, role: str) -> tuple[str, tuple[int, int]]:
    """Return (format, (width, height)) or raise BadSample. The whole entropy-coded stream is
    decoded (JPEG at 1/8 scale, which skips only the IDCT), so truncated and corrupt files are
    caught here rather than by the decoder halfway through a training run."""
    fmt = image_format(data)
    if fmt is None:
        raise BadSample(f"{role} is not a JPEG or PNG image")
    try:
        with Image.open(io.BytesIO(data)) as im:
            size = im.size
            if fmt == "jpg":
                im.draft(im.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
            im.load()
    except Exception as e:  # PIL raises many types for damaged files
        raise BadSample(f"{role} is damaged or truncated ({e})") from None
    return fmt, size


def load_sample(sources: list[Source], sample: Sample, bg_cache: dict) -> dict[str, tuple[str, bytes]]:
    """Read and check the four images of a sample: role -> (format, bytes). bg images are shared
    by thousands of samples, so their verdict is cached."""
    out, sizes = {}, {}
    for role, (si, loc) in zip(ROLES, sample.refs):
        if role == "bg" and (si, loc) in bg_cache:
            verdict = bg_cache[(si, loc)]
            if isinstance(verdict, BadSample):
                raise verdict
            fmt, size, data = verdict
        else:
            try:
                data = sources[si].read(loc)
                fmt, size = check_image(data, role)
            except BadSample as e:
                if role == "bg":
                    bg_cache[(si, loc)] = e
                raise
            except (OSError, zipfile.BadZipFile, zlib.error) as e:
                raise BadSample(f"{role} could not be read ({e})") from None
            if role == "bg":
                bg_cache[(si, loc)] = (fmt, size, data)
        out[role], sizes[role] = (fmt, data), size
    if len(set(sizes.values())) > 1:
        raise BadSample("images differ in size: " + ", ".join(f"{r} {w}x{h}" for r, (w, h) in sizes.items()))
    return out
