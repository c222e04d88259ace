"""Labelled-image importers: manifests and class folders, on real LC25000 data and broken fixtures."""

from pathlib import Path

import pytest

from pallava.data.importers.manifest import read_image_folder, read_manifest


@pytest.fixture(scope="module")
def lung_manifest(lung):
    return lung / "manifest.csv"


def test_read_real_manifest_resolves_paths_and_splits(lung_manifest):
    items = read_manifest(lung_manifest)
    assert len(items) == 3120
    assert all(Path(item.path).is_absolute() and Path(item.path).is_file() for item in items[:50])
    dev = read_manifest(lung_manifest, split="dev")
    assert len(dev) == 120 and {item.split for item in dev} == {"dev"}
    assert {item.label for item in dev} == {"lung_aca", "lung_n", "lung_scc"}
    train_clusters = {item.cluster for item in items if item.split == "train"}
    assert not train_clusters & {item.cluster for item in dev}


def _write(tmp_path, text, images=("a/x.png",)):
    for image in images:
        (tmp_path / image).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / image).write_bytes(b"png")
    path = tmp_path / "manifest.csv"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("file,label\na/x.png,a\n", "missing \\['path'\\]"),
        ("path,label\na/x.png,\n", "row 2: field 'label' is empty"),
        ("path,label\na/x.png,a\na/missing.png,a\n", "row 3: field 'path': image file not found"),
        ("path,label\na/x.png,a,extra\n", "row 2: more fields"),
        ("path,label\n", "no rows"),
    ],
)
def test_manifest_errors_name_file_row_field(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match=message) as info:
        read_manifest(path)
    assert str(path) in str(info.value)


def test_manifest_split_without_column(tmp_path):
    with pytest.raises(ValueError, match="no 'split' column"):
        read_manifest(_write(tmp_path, "path,label\na/x.png,a\n"), split="dev")


def test_image_folder_uses_subfolder_as_class(tmp_path):
    for name in ("b/2.jpg", "b/1.PNG", "a/3.tif", "a/notes.txt", ".hidden/4.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    items = read_image_folder(tmp_path)
    assert [(Path(i.path).name, i.label) for i in items] == [("3.tif", "a"), ("1.PNG", "b"), ("2.jpg", "b")]
    with pytest.raises(ValueError, match="no images"):
        read_image_folder(tmp_path / "a")


def test_labelled_images_from_a_manifest_its_folder_or_class_folders(lung_manifest, tmp_path):
    """Every labelled-image reader (evaluation, PLIP, data build) takes the three layouts alike."""
    from pallava.data.importers.manifest import read_labelled_images

    dev = read_manifest(lung_manifest, split="dev")
    assert read_labelled_images(lung_manifest.parent, "dev") == dev  # a folder holding manifest.csv
    assert read_labelled_images(lung_manifest, "dev") == dev
    for item in dev[:2] + dev[-2:]:  # root/<class>/<image>, as many public datasets ship
        target = tmp_path / item.label / Path(item.path).name
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(Path(item.path).read_bytes())
    folder = read_labelled_images(tmp_path)
    assert [(Path(i.path).name, i.label) for i in folder] == sorted(
        (Path(i.path).name, i.label) for i in dev[:2] + dev[-2:]
    )
    with pytest.raises(ValueError, match="an image folder .* has no splits, but split 'dev' was asked for"):
        read_labelled_images(tmp_path, "dev")
