"""`slide map --cohort` with the local engine: per-slide maps, cohort summary, skipping, failures, errors."""

import csv
import json

import pytest

from pallava.cli import main
from pallava.slides.cohort import CohortSettings, map_cohort, read_cohort
from pallava.slides.mapping import TilingOptions, load_classes

# Coarse tiles on a small thumbnail: a handful of tiles per slide keeps a cohort cheap.
OPTIONS = TilingOptions(mpp=2.0, tile_size=224, min_tissue=0.25, thumbnail_side=512)
TEMPLATES = ("an H&E image of {name}.",)


def make_cohort(folder, svs):
    """Two readings of the real slide (one with an explicit scan mpp) and a truncated, unreadable one."""
    (folder / "truncated.svs").write_bytes(svs.read_bytes()[:100_000])
    cohort = folder / "cohort.csv"
    cohort.write_text(f"path,id,mpp\n{svs},first,\n{svs},second,0.499\ntruncated.svs,,\n")
    return cohort


class CountingLoader:
    """Loads PLIP as usual and counts the images it encodes (to see what a re-run recomputes)."""

    def __init__(self):
        self.images = 0

    def __call__(self, model_dir, device):
        from pallava.models.plip import PlipZeroShot

        plip, counter = PlipZeroShot.from_pretrained(model_dir, device), self
        encode = plip.encode_pixels

        def counted(pixel_values):
            counter.images += len(pixel_values)
            return encode(pixel_values)

        plip.encode_pixels = counted
        return plip


def test_cohort_maps_each_slide_reports_failures_and_skips_finished_slides(svs, tiny_plip_dir, tmp_path):
    cohort = make_cohort(tmp_path, svs)
    settings = CohortSettings(OPTIONS, load_classes("lc25000-lung"), TEMPLATES, batch_size=4)
    out = tmp_path / "out"
    loader = CountingLoader()
    rows = map_cohort(cohort, tiny_plip_dir, out, settings, load_model=loader)

    assert [(r["id"], r["status"]) for r in rows] == [
        ("first", "mapped"),
        ("second", "mapped"),
        ("truncated", "failed"),
    ]
    assert "truncated.svs: a TIFF that is truncated" in rows[2]["error"]
    for slide_id in ("first", "second"):  # exactly the files `slide map` writes
        folder = out / "slides" / slide_id
        assert {p.name for p in folder.iterdir()} == {
            "embeddings", "summary.json", "tiles.geojson", "tissue.png", "heatmap_lung_adenocarcinoma.png",
            "heatmap_benign_lung_tissue.png", "heatmap_lung_squamous_cell_carcinoma.png"}  # fmt: skip
    summary = json.loads((out / "slides" / "first" / "summary.json").read_text())
    tiles = summary["tiles"]
    assert loader.images == 2 * tiles

    with (out / "cohort.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [r["id"] for r in table] == ["first", "second", "truncated"]
    first = table[0]
    assert int(first["tiles"]) == tiles and float(first["tissue_fraction"]) == summary["tissue_fraction"]
    # tissue area = tissue share x slide area: 2220 x 2967 px at 0.499 um/px
    assert float(first["tissue_area_mm2"]) == pytest.approx(
        summary["tissue_fraction"] * 2220 * 2967 * 0.499**2 / 1e6, rel=1e-3
    )
    fractions = [float(first[f"fraction:{label}"]) for label in ("lung_aca", "lung_n", "lung_scc")]
    assert sum(fractions) == pytest.approx(1.0, abs=1e-3)
    assert fractions[0] == pytest.approx(summary["classes"]["lung_aca"]["tiles_predicted"] / tiles, abs=1e-4)
    assert table[2]["status"] == "failed" and "truncated" in table[2]["error"]
    report = (out / "cohort.md").read_text()
    assert "3 slides: 2 mapped, 1 failed" in report and "## Failures" in report and "`truncated`" in report

    # A re-run maps only what is unfinished: the failed slide (still failing), nothing is embedded again.
    again = CountingLoader()
    rerun = map_cohort(cohort, tiny_plip_dir, out, settings, load_model=again)
    assert [r["status"] for r in rerun] == ["done earlier", "done earlier", "failed"] and again.images == 0
    assert [{k: v for k, v in r.items() if k != "status"} for r in rerun] == [
        {k: v for k, v in r.items() if k != "status"} for r in rows
    ]

    # Other classes: the maps are redrawn from the cached embeddings, still without embedding a tile.
    other = CohortSettings(OPTIONS, load_classes("nct-crc-he"), TEMPLATES, batch_size=4)
    again = CountingLoader()
    assert [r["status"] for r in map_cohort(cohort, tiny_plip_dir, out, other, load_model=again)][:2] == [
        "mapped"
    ] * 2
    assert again.images == 0


def test_cohort_file_errors_name_the_row_and_field(tmp_path):
    cases = {
        "slide,id\na.svs,x\n": "expected a header with a 'path' column",
        "path,id\na.svs,x\nb.svs,x\n": "row 3: id 'x' already used on row 2",
        "path,id\na.svs,../up\n": "row 2: field 'id' '../up' must be letters",
        "path,mpp\na.svs,fast\n": "row 2: field 'mpp' must be a positive number, got 'fast'",
        'path\n""\n': "row 2: field 'path' is empty",
        "path\n": "lists no slides",
    }
    for number, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"c{number}.csv"
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_cohort(path)
    path = tmp_path / "ok.csv"
    path.write_text("path,mpp\nsub/a.svs,0.25\n/abs/b.tiff,\n")
    first, second = read_cohort(path)
    assert (first.id, first.path, first.mpp) == ("a", str(tmp_path / "sub" / "a.svs"), 0.25)
    assert (second.id, second.path, second.mpp) == ("b", "/abs/b.tiff", None)


def test_cohort_command_end_to_end_and_engine_errors(svs, tiny_plip_dir, tmp_path, capsys, monkeypatch):
    cohort = make_cohort(tmp_path, svs)
    out = tmp_path / "map"
    argv = [
        "slide",
        "map",
        "--cohort",
        str(cohort),
        "--model",
        str(tiny_plip_dir),
        "--out",
        str(out),
        "--mpp",
        "2.0",
        "--classes",
        "lc25000-lung",
        "--template",
        TEMPLATES[0],
        "--batch-size",
        "8",
    ]
    assert main(argv) == 1  # one slide failed; the others are mapped
    printed = capsys.readouterr().out
    assert "first: mapped" in printed and "truncated: failed" in printed and "2 of 3 slides mapped" in printed
    assert (out / "slides" / "second" / "tiles.geojson").is_file() and (out / "cohort.csv").is_file()
    assert main(argv) == 1  # the re-run lists the finished slides and retries the failed one
    printed = capsys.readouterr().out
    assert (
        "first: done earlier (" in printed
        and "second: done earlier (" in printed
        and "truncated: failed" in printed
    )

    assert (
        main(
            [
                "slide",
                "map",
                "--slide",
                str(svs),
                "--model",
                str(tiny_plip_dir),
                "--out",
                str(out),
                "--engine",
                "ray",
            ]
        )
        == 1
    )
    assert "--engine, --ray-address and --workers apply to --cohort" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # as if Ray were not installed
    assert main([*argv, "--engine", "ray"]) == 1
    assert "needs Ray, which is not installed: pip install 'pallava[ray]'" in capsys.readouterr().err
