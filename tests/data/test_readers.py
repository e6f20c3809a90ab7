import pytest

from arra_megatron.data.readers import (
    TarShardSource, check_sample, detect_kind, open_source, read_tar_shard)
from tests.support.tiny_data import write_tar


def _members(n):
    return [m for i in range(n) for m in ((f"k{i}.jpg", b"IMG%d" % i * 50), (f"k{i}.txt", b"caption %d" % i))]


def test_clean_shard_groups_members_and_records_offsets(tmp_path):
    offsets = write_tar(tmp_path / "a.tar", _members(3) + [("k3.json", b"{}")])
    samples = list(read_tar_shard(str(tmp_path / "a.tar")))
    assert [s.key for s in samples] == ["k0", "k1", "k2", "k3"]
    assert [check_sample(s, True) for s in samples] == [
        (None, "caption 0"), (None, "caption 1"), (None, "caption 2"), ("image_missing", None)]
    assert samples[1].ref.offset == offsets["k1.jpg"][0] and samples[1].ref.length == 200
    assert samples[1].image == (tmp_path / "a.tar").read_bytes()[offsets["k1.jpg"][0]:][:200]


@pytest.mark.parametrize("cut", ["at_header", "in_header", "garbage_header"])
def test_damage_is_detected_and_samples_before_it_are_kept(tmp_path, cut):
    path = tmp_path / "a.tar"
    offsets = write_tar(path, _members(4))
    data = path.read_bytes()
    header = offsets["k2.jpg"][0] - 512  # start of k2.jpg's header block
    if cut == "at_header":  # complete members, then no end-of-archive blocks
        data = data[:header]
    elif cut == "in_header":
        data = data[:header + 100]
    else:
        data = data[:header] + b"\xff" * 512 + data[header + 512:]
    path.write_bytes(data)
    samples = list(read_tar_shard(str(path)))
    assert [s.key for s in samples] == ["k0", "k1", str(path)]
    assert [s.skip for s in samples] == [None, None, "tar_truncated"]


def test_missing_or_empty_shard_is_unreadable(tmp_path):
    (tmp_path / "empty.tar").write_bytes(b"")
    for name in ("empty.tar", "absent.tar"):
        assert [s.skip for s in read_tar_shard(str(tmp_path / name))] == ["tar_unreadable"]


def test_brace_patterns_and_directories(tmp_path):
    for i in range(3):
        write_tar(tmp_path / f"{i:05d}.tar", _members(1))
    assert TarShardSource(str(tmp_path / "{00000..00002}.tar")).units == [
        str(tmp_path / f"{i:05d}.tar") for i in range(3)]
    assert TarShardSource(str(tmp_path)).units == [str(tmp_path / f"{i:05d}.tar") for i in range(3)]
    assert detect_kind(str(tmp_path)) == "tar"
    assert detect_kind("x/{0..3}.tar") == "tar"
    assert detect_kind("meta.csv") == "csv" and detect_kind("meta.jsonl") == "jsonl"
    (tmp_path / "cls" / "a").mkdir(parents=True)
    assert detect_kind(str(tmp_path / "cls")) == "folder"
    with pytest.raises(ValueError, match="--input-kind"):
        detect_kind(str(tmp_path / "meta.parquet"))


def test_csv_template_columns_are_checked_up_front(tmp_path):
    (tmp_path / "t.csv").write_text("path,view\nx.jpg,PA\n")
    with pytest.raises(ValueError, match="impression.*--prompt-template"):
        open_source(str(tmp_path / "t.csv"), prompt_template="{view} view chest X-ray image, {impression}",
                    image_column="path")


def test_image_directory_source_lists_images_at_any_depth_without_a_condition(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "z.png").write_bytes(b"Z" * 7)
    (tmp_path / "a" / "b" / "y.JPG").write_bytes(b"Y" * 5)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    source = open_source(str(tmp_path), "images")
    assert (source.kind, source.condition) == ("images", "none")
    samples = list(source.read(0, len(source.units)))
    assert [s.key for s in samples] == ["a/b/y.JPG", "z.png"]
    assert [s.image for s in samples] == [b"Y" * 5, b"Z" * 7]
    assert samples[1].ref.source == str(tmp_path / "z.png") and samples[1].ref.length == 7
    with pytest.raises(ValueError, match="expected auto, tar, csv, jsonl, folder or images"):
        open_source(str(tmp_path), "zip")
