"""pipeline.tar_index: DALI's index format and the check that an index belongs to its tar."""

import io
import tarfile

import pytest

from pipeline.tar_index import HEADER, header_names, index_line, index_matches, parse_index


def write_tar(path, names):
    """A tar of `names`, each holding its own name; (name, data offset, size) per member."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name in names:
            data = name.encode() * 3
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        return [(m.name, m.offset_data, m.size) for m in tar]


def index_text(samples):
    return f"v1.2 {len(samples)}\n" + "".join(index_line(m) + "\n" for m in samples)


def test_an_index_reads_back_as_written(tmp_path):
    members = write_tar(tmp_path / "a.tar", ["k0.bg.jpg", "k0.json", "k1.bg.jpg", "k1.json"])
    samples = [members[:2], members[2:]]
    assert parse_index(tmp_path / "a.idx", index_text(samples)) == samples
    with pytest.raises(ValueError, match="is not a v1.2 index of 2 samples"):
        parse_index(tmp_path / "a.idx", "v1.2 3\n" + index_text(samples).split("\n", 1)[1])


def test_headers_name_their_members(tmp_path):
    long = "k" * 120 + ".bg.jpg"  # a GNU long-name header comes first: not checked
    members = write_tar(tmp_path / "a.tar", ["k0.bg.jpg", long])
    raw = (tmp_path / "a.tar").read_bytes()
    assert all(header_names(raw[offset - HEADER:offset], name) for name, offset, _ in members)
    assert not header_names(raw[members[0][1] - HEADER:members[0][1]], "k9.bg.jpg")


def test_an_index_of_another_tar_does_not_match(tmp_path):
    ours = write_tar(tmp_path / "a.tar", ["k0.bg.jpg", "k0.json"])
    theirs = write_tar(tmp_path / "b.tar", ["x0.bg.jpg", "x0.json"])
    size = (tmp_path / "a.tar").stat().st_size
    assert index_matches(tmp_path / "a.tar", [ours], size)
    assert not index_matches(tmp_path / "a.tar", [theirs], size)
    assert not index_matches(tmp_path / "a.tar", [ours], ours[-1][1] + ours[-1][2] - 1)  # past the end
