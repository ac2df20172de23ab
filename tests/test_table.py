"""The labels table: ids resolve to files, every bad row is one line naming the CSV, folds are
stratified."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest

from patchgd.data.table import ImageTable, TableItem, read_table, stratified_folds
from patchgd.errors import ConfigError, DataError


def touch(folder: Path, *names: str) -> None:
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")  # the table checks existence only


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text.lstrip("\n"))
    return path


def test_bare_ids_resolve_by_extension_and_paths_as_given(tmp_path):
    touch(tmp_path, "0005f7aa.tiff", "b.PNG", "c.ome.tif", "sub/d.jpg", "e.svs")
    outside = tmp_path / "elsewhere" / "f.png"
    touch(tmp_path, "elsewhere/f.png")
    csv = write_csv(
        tmp_path / "labels.csv",
        f"""
image_id,label,split
0005f7aa,0,train
b,1,train
c,2,val
sub/d.jpg,1,val
e.svs,0,
{outside},2,test
""",
    )
    table = read_table(csv)
    assert [Path(item.path) for item in table] == [
        tmp_path / "0005f7aa.tiff",
        tmp_path / "b.PNG",  # upper-case extension on a case-sensitive file system
        tmp_path / "c.ome.tif",
        tmp_path / "sub" / "d.jpg",
        tmp_path / "e.svs",
        outside,
    ]
    assert table.labels == [0, 1, 2, 1, 0, 2] and table.num_classes == 3
    assert [item.split for item in table] == ["train", "train", "val", "val", None, "test"]
    assert table.skipped == [] and table.source == str(csv)
    assert [i.image_id for i in table.split("val")] == ["c", "sub/d.jpg"]
    with pytest.raises(ConfigError, match="split='valid' is not in the table.*test, train, val"):
        table.split("valid")


def test_root_other_than_the_csv_folder_and_custom_columns(tmp_path):
    images = tmp_path / "train_images"
    touch(images, "aaa.tiff", "bbb.tiff")
    csv = write_csv(
        tmp_path / "train.csv",
        """
image_id,data_provider,isup_grade,gleason_score
aaa,karolinska,5,4+5
bbb,radboud,0,negative
""",
    )
    table = read_table(csv, images, label_column="isup_grade", num_classes=6)
    assert table.labels == [5, 0] and table.num_classes == 6
    assert table[0].path == str(images / "aaa.tiff") and table[0].split is None


def test_class_names_map_to_indices(tmp_path):
    touch(tmp_path, "a.png", "b.png", "c.png")
    csv = write_csv(tmp_path / "l.csv", "image_id,label\na.png,tumor\nb.png,normal\nc.png,cat\n")
    table = read_table(csv, classes=["normal", "tumor"])
    assert table.labels == [1, 0] and table.classes == ("normal", "tumor")
    assert table.num_classes == 2
    assert (
        "line 4: label 'cat' is not one of the classes [normal, tumor]" in table.skipped[0].reason
    )


BAD_ROWS = """
image_id,label,fold
good1,0,0
bad_label,abc,1
good2,1,1
good1,1,2
out_of_range,7,0
negative,-1,0
half,2.5,0
missing,1,0
badfold,1,x
good3,2.0,2
short
,1,0
"""
MESSAGES = [
    "line 3: label 'abc' is not an integer",
    "line 5: image_id 'good1' is listed twice (first on line 2)",
    "line 6: label 7 is out of range 0..2",
    "line 7: label -1 is out of range 0..2",
    "line 8: label '2.5' is not an integer",
    "line 9: image file not found: {root}/missing (also tried .png, .jpg",
    "line 10: fold 'x' is not a non-negative integer",
    "line 12: expected 3 fields, found 1",
    "line 13: empty image_id",
]


def test_every_bad_row_gives_one_line_and_the_others_survive(tmp_path, caplog):
    touch(tmp_path, "good1.png", "good2.png", "good3.png", "bad_label.png", "out_of_range.png")
    touch(tmp_path, "negative.png", "half.png", "badfold.png")
    csv = write_csv(tmp_path / "labels.csv", BAD_ROWS)
    with caplog.at_level(logging.WARNING, logger="patchgd.data"):
        table = read_table(csv, num_classes=3)
    assert [item.image_id for item in table] == ["good1", "good2", "good3"]
    assert table.labels == [0, 1, 2] and [item.fold for item in table] == [0, 1, 2]
    reasons = [s.reason for s in table.skipped]
    assert len(reasons) == len(MESSAGES)
    for reason, expected in zip(reasons, MESSAGES, strict=True):
        assert reason.startswith(f"{csv}, ") and "\n" not in reason
        assert expected.format(root=tmp_path) in reason, reason
    assert [s.item for s in table.skipped][:2] == ["bad_label", "good1"]
    assert len(caplog.records) == len(MESSAGES)  # one warning per skipped row
    report = table.report()
    assert "3 images in 3 classes (0: 1, 1: 1, 2: 1)" in report and "9 skipped:" in report
    assert all(r in report for r in reasons)


def test_on_error_raise_stops_at_the_first_bad_row(tmp_path):
    touch(tmp_path, "good1.png", "bad_label.png")
    csv = write_csv(tmp_path / "labels.csv", BAD_ROWS)
    with pytest.raises(DataError, match=r"labels.csv, line 3: label 'abc' is not an integer$"):
        read_table(csv, num_classes=3, on_error="raise")
    with pytest.raises(ConfigError, match="on_error='ignore'"):
        read_table(csv, on_error="ignore")


def test_inferred_num_classes_and_a_file_named_twice(tmp_path):
    touch(tmp_path, "a.png", "b.png")
    csv = write_csv(tmp_path / "l.csv", "image_id,label\na,3\na.png,1\nb,0\n")
    table = read_table(csv)
    assert table.num_classes == 4 and table.labels == [3, 0]
    assert f"line 3: {tmp_path / 'a.png'} is already listed on line 2" in table.skipped[0].reason


def test_csv_problems(tmp_path):
    touch(tmp_path, "a.png")
    with pytest.raises(DataError, match=r"labels CSV not found: .*nothing.csv"):
        read_table(tmp_path / "nothing.csv")
    empty = write_csv(tmp_path / "empty.csv", "")
    with pytest.raises(DataError, match=r"labels CSV .*empty.csv is empty"):
        read_table(empty)
    header = write_csv(tmp_path / "header.csv", "image_id,label\n\n")
    with pytest.raises(DataError, match=r"header.csv has a header but no rows"):
        read_table(header)
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(DataError, match=r"cannot read labels CSV .*binary.csv: UnicodeDecodeError"):
        read_table(binary)
    columns = write_csv(tmp_path / "cols.csv", "image_id,isup_grade\na,1\n")
    with pytest.raises(
        ConfigError,
        match=r"label_column='label' is not a column of .*cols.csv; "
        r"columns found: image_id, isup_grade",
    ):
        read_table(columns)
    with pytest.raises(ConfigError, match="split_column='set' is not a column"):
        read_table(columns, label_column="isup_grade", split_column="set")
    nothing_usable = write_csv(tmp_path / "bad.csv", "image_id,label\nzzz,1\n")
    with pytest.raises(DataError, match=r"none of the 1 rows is usable; first problem: .*zzz"):
        read_table(nothing_usable)
    with pytest.raises(ConfigError, match="num_classes must be at least 1, got 0"):
        read_table(columns, num_classes=0)


def make_table(counts: dict[int, int]) -> ImageTable:
    items = [
        TableItem(f"{label}_{i}", f"/x/{label}_{i}.png", label)
        for label, n in counts.items()
        for i in range(n)
    ]
    return ImageTable(items, num_classes=max(counts) + 1)


def test_stratified_folds(tmp_path):
    table = make_table({0: 23, 1: 11, 2: 5, 3: 7, 4: 3})
    folded = stratified_folds(table, k=5, seed=3)
    assert [i.image_id for i in folded] == [i.image_id for i in table]  # order kept
    assert all(i.fold is None for i in table)  # the input is not modified
    folds = [item.fold for item in folded]
    sizes = Counter(folds)
    assert set(sizes) == set(range(5)) and max(sizes.values()) - min(sizes.values()) <= 1
    for label, n in {0: 23, 1: 11, 2: 5, 3: 7, 4: 3}.items():
        per_fold = Counter(f for f, item in zip(folds, folded, strict=True) if item.label == label)
        assert sum(per_fold.values()) == n
        assert max(per_fold.values()) - min(per_fold.values(), default=0) <= 1
        if n >= 5:
            assert set(per_fold) == set(range(5))  # every class in every fold
    for k in range(5):
        val, train = folded.fold(k, "val"), folded.fold(k, "train")
        assert {i.image_id for i in val}.isdisjoint({i.image_id for i in train})
        assert len(val) + len(train) == len(table)
        assert all(i.fold == k for i in val)
    vals = [i.image_id for k in range(5) for i in folded.fold(k, "val")]
    assert sorted(vals) == sorted(i.image_id for i in table)  # validation folds cover all
    assert stratified_folds(table, k=5, seed=3) == folded  # deterministic
    assert stratified_folds(table, k=5, seed=4) != folded
    with pytest.raises(ConfigError, match="assign them with stratified_folds"):
        table.fold(0)
    with pytest.raises(ConfigError, match="fold 7 is not a fold"):
        folded.fold(7)
    with pytest.raises(ConfigError, match="num_folds must be at least 2, got 1"):
        stratified_folds(table, k=1)
    with pytest.raises(ConfigError, match="need at least 5 images"):
        stratified_folds(make_table({0: 2, 1: 2}), k=5)


def test_folds_from_the_csv(tmp_path):
    touch(tmp_path, "a.png", "b.png", "c.png")
    csv = write_csv(tmp_path / "l.csv", "image_id,label,fold\na.png,0,0\nb.png,1,1\nc.png,0,1\n")
    table = read_table(csv)
    assert [i.image_id for i in table.fold(1, "val")] == ["b.png", "c.png"]
    assert [i.image_id for i in table.fold(1)] == ["a.png"]
