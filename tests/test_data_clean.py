"""Cleaning pipeline on real shared images: stages, reasons, exactly-once outputs, resume, report, CLI."""

import json
import shutil
from pathlib import Path

import pytest

from pallava.cli import main as cli_main
from pallava.data.clean import CleanConfig, LexiconJudge, clean
from pallava.data.clean.dedup import DuplicateIndex, text_key

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HUMAN = (
    "Haematoxylin and eosin section of a human lung resection showing adenocarcinoma with acinar glands, "
    "atypical nuclei and prominent nucleoli in a fibrotic stroma, case {}"
)


@pytest.fixture(scope="module")
def tiles():
    folder = SHARED / "lc25000-lung" / "images" / "lung_aca"
    if not folder.is_dir():
        pytest.skip("shared data not available")
    return sorted(folder.glob("*.jpeg"))[:8]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _write_input(path, records, extra_lines=()):
    with path.open("w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
        for line in extra_lines:
            handle.write(line + "\n")
    return path


def _corpus(tmp_path, tiles):
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    records = [
        {"id": f"h{i}", "image": str(tile), "caption": HUMAN.format(i)} for i, tile in enumerate(tiles[:5])
    ]
    records += [
        {"id": "mice", "image": str(tiles[5]), "caption": HUMAN.format(5).replace("human", "mice")},
        {
            "id": "rat",
            "image": str(tiles[5]),
            "caption": "Lung of a Wistar rat after exposure, " + HUMAN.format(6),
        },
        {"id": "dogs", "image": str(tiles[6]), "caption": HUMAN.format(7) + " from two dogs"},
        {
            "id": "antibody",
            "image": str(tiles[6]),
            "caption": "Rabbit monoclonal antibody staining, " + HUMAN.format(8),
        },
        {"id": "short", "image": str(tiles[7]), "caption": "lung adenocarcinoma"},
        {"id": "dup", "image": str(tiles[0]), "caption": HUMAN.format(0).upper() + "!"},
        {"id": "corrupt", "image": "corrupt.jpg", "caption": HUMAN.format(9)},
        {"id": "missing", "image": "nowhere.jpg", "caption": HUMAN.format(10)},
        {
            "id": "vqa",
            "image": str(tiles[1]),
            "question": "Is this malignant?",
            "answer": "yes",
            "answer_type": "closed",
        },
        {"id": "noid", "image": str(tiles[1]), "caption": HUMAN.format(11)} | {"id": None},
    ]
    return _write_input(tmp_path / "corpus.jsonl", records, ["{not json"])


EXPECTED = {
    "mice": ("text", "non-human species"),
    "rat": ("text", "non-human species"),
    "dogs": ("text", "non-human species"),
    "short": ("length", "caption too short"),
    "dup": ("duplicate", "duplicate"),
    "corrupt": ("integrity", "corrupt image"),
    "missing": ("integrity", "missing file"),
    "line-15": ("input", "malformed record"),
    "line-16": ("input", "invalid JSON"),
}


def test_clean_real_tiles_every_record_exactly_once(tmp_path, tiles):
    corpus = _corpus(tmp_path, tiles)
    summary = clean(corpus, tmp_path / "out", CleanConfig(workers=2, chunk_size=4), progress=False)
    kept, rejected = _rows(tmp_path / "out" / "kept.jsonl"), _rows(tmp_path / "out" / "rejected.jsonl")
    assert {r["id"]: (r["stage"], r["reason"]) for r in rejected} == EXPECTED
    assert [r["id"] for r in kept] == ["h0", "h1", "h2", "h3", "h4", "antibody", "vqa"]
    assert summary["input"] == 16 == len(kept) + len(rejected)
    assert next(r for r in rejected if r["id"] == "dup")["detail"] == "of h0"
    assert all(len(r["meta"]["clean"]["phash"]) == 16 and r["meta"]["clean"]["width"] == 224 for r in kept)
    report = (tmp_path / "out" / "report.md").read_text()
    assert (
        "| text | 3 | 9 |" in report and "### integrity: corrupt image (1)" in report and "`mice`" in report
    )
    # re-running a finished folder changes nothing
    before = {n: (tmp_path / "out" / n).read_bytes() for n in ("kept.jsonl", "rejected.jsonl", "report.md")}
    assert clean(corpus, tmp_path / "out", CleanConfig(workers=1), progress=False)["resumed_from"] == 16
    assert before == {n: (tmp_path / "out" / n).read_bytes() for n in before}


def test_resume_after_torn_write_matches_uninterrupted_run(tmp_path, tiles):
    corpus = _corpus(tmp_path, tiles)
    config = CleanConfig(workers=1, chunk_size=3)
    clean(corpus, tmp_path / "full", config, progress=False)
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(tmp_path / "full" / "state.json", partial)
    kept = (tmp_path / "full" / "kept.jsonl").read_text().splitlines(keepends=True)
    rejected = (tmp_path / "full" / "rejected.jsonl").read_text().splitlines(keepends=True)
    # as if killed mid-write: some lines done, plus half a line in each file
    (partial / "kept.jsonl").write_text("".join(kept[:3]) + kept[3][:25])
    (partial / "rejected.jsonl").write_text("".join(rejected[:2]) + rejected[2][:10])
    summary = clean(corpus, partial, config, progress=False)
    assert summary["resumed_from"] == 5
    for name in ("kept.jsonl", "rejected.jsonl", "report.md"):
        assert (partial / name).read_bytes() == (tmp_path / "full" / name).read_bytes()


def test_pixel_limit_and_changed_settings(tmp_path, tiles):
    corpus = _write_input(
        tmp_path / "c.jsonl", [{"id": "a", "image": str(tiles[0]), "caption": HUMAN.format(0)}]
    )
    clean(corpus, tmp_path / "out", CleanConfig(max_pixels=224 * 223, workers=1), progress=False)
    (row,) = _rows(tmp_path / "out" / "rejected.jsonl")
    assert (row["stage"], row["reason"]) == ("integrity", "too large") and "50,176 pixels" in row["detail"]
    with pytest.raises(ValueError, match="different input or decision settings"):
        clean(corpus, tmp_path / "out", CleanConfig(workers=1), progress=False)


def test_duplicate_ids_in_input_are_an_error(tmp_path, tiles):
    record = {"id": "same", "image": str(tiles[0]), "caption": HUMAN.format(0)}
    corpus = _write_input(tmp_path / "c.jsonl", [record, record])
    with pytest.raises(ValueError, match="line 2: id 'same' already used on line 1"):
        clean(corpus, tmp_path / "out", progress=False)


def test_lexicon_judge_species_and_reagents():
    judge = LexiconJudge()
    rejected = [
        "Liver of C57BL/6 mice fed a high-fat diet",
        "Kidney from Sprague-Dawley rats",
        "Skin biopsy from two dogs",
        "Murine model of colitis",
        "Mammary tumour in a cat",
        "Porcine aortic valve",
        "Zebrafish retina",
        "A veterinary case of lymphoma",
        "Patient-derived xenograft tumour",
    ]
    kept = [
        "Rabbit monoclonal anti-CD3 antibody on human tonsil",
        "Goat anti-mouse secondary antibody, human colon",
        "Chicken-wire fibrosis in steatohepatitis",
        "FISH shows HER2 amplification",
        "Cat-scratch disease lymphadenitis",
        "Horseradish peroxidase detection in human skin",
        "Rat-bite erosions in gout",
        "Canine tooth with periapical granuloma",
        "Pigmented lesion of the skin",
        "Mousy odour is not a histological feature",
        "Ratio of nuclei to cytoplasm",
        "Rodent ulcer of the nose (basal cell carcinoma)",
        "Blocked with bovine serum albumin; human lymph node",
    ]
    assert [v.ok for v in judge.judge_texts(rejected)] == [False] * len(rejected)
    assert [v.ok for v in judge.judge_texts(kept)] == [True] * len(kept)
    assert judge.judge_text("Sections from 3 mice").detail == "mice"
    assert not LexiconJudge(extra_terms=["alpaca"]).judge_text("an alpaca lymph node").ok


def test_duplicate_index_modes_and_radius():
    base = 0x0F0F_F0F0_1234_ABCD
    near, far = f"{base ^ 0b1011:016x}", f"{base ^ 0xFFFF_0000_0000_0000:016x}"
    pair = DuplicateIndex("pair", max_hamming=3)
    pair.add("a", f"{base:016x}", text_key("A caption."))
    assert pair.find(near, text_key("a  CAPTION")) == "a"  # 3 bits apart, same normalised text
    assert pair.find(near, text_key("another caption")) is None
    assert pair.find(far, text_key("a caption")) is None
    image = DuplicateIndex("image", max_hamming=3)
    image.add("a", f"{base:016x}", text_key("x"))
    assert image.find(near, text_key("y")) == "a" and image.find(f"{base ^ 0b11111:016x}", "y") is None
    caption = DuplicateIndex("caption")
    caption.add("a", None, text_key("Same text"))
    assert caption.find(far, text_key("same text.")) == "a"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"stages": ["image", "integrity", "duplicate"]}, "must start with 'integrity'"),
        ({"stages": ["integrity", "text", "text", "duplicate"]}, "middle stages must be distinct"),
        ({"duplicate_mode": "fuzzy"}, "duplicate_mode"),
        ({"min_wrds": 3}, r"unknown field\(s\) \['min_wrds'\]"),
        ({"text_judge": {"type": "plip"}}, "text_judge: type must be one of none, lexicon, openai"),
        ({"image_judge": {"type": "plip"}}, "image_judge \\(plip\\): needs 'model_dir'"),
    ],
)
def test_config_errors(tmp_path, data, message, tiles):
    path = tmp_path / "clean.yaml"
    path.write_text(json.dumps(data))
    corpus = _write_input(
        tmp_path / "c.jsonl", [{"id": "a", "image": str(tiles[0]), "caption": HUMAN.format(0)}]
    )
    with pytest.raises(ValueError, match=message):
        clean(corpus, tmp_path / "out", CleanConfig.from_file(path), progress=False)


def test_cli_clean_with_reordered_stages_and_shards(tmp_path, tiles, capsys):
    corpus = _corpus(tmp_path, tiles)
    config = tmp_path / "clean.yaml"
    config.write_text("stages: [integrity, length, text, duplicate]\nmin_words: 5\n")
    code = cli_main(
        [
            "data",
            "clean",
            "--input",
            str(corpus),
            "--out",
            str(tmp_path / "out"),
            "--config",
            str(config),
            "--workers",
            "1",
            "--shard-size",
            "4",
            "--no-progress",
        ]
    )
    assert code == 0 and "kept 7 of 16 records" in capsys.readouterr().out
    rejected = {r["id"]: r["stage"] for r in _rows(tmp_path / "out" / "rejected.jsonl")}
    assert rejected["short"] == "length" and "image" not in rejected.values()
    index = json.loads((tmp_path / "out" / "shards" / "index.json").read_text())
    assert index["records"] == 7 and [s["records"] for s in index["shards"]] == [4, 3]
    assert (
        cli_main(["data", "clean", "--input", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o2")])
        == 1
    )
    assert "none.jsonl: input file not found" in capsys.readouterr().err


def test_stain_image_judge_in_pipeline_rejects_photographs(tmp_path, tiles):
    photos = sorted((SHARED / "samples" / "non-pathology").iterdir())
    records = [{"id": f"p{i}", "image": str(p), "caption": HUMAN.format(i)} for i, p in enumerate(photos)]
    records += [
        {"id": f"t{i}", "image": str(t), "caption": HUMAN.format(10 + i)} for i, t in enumerate(tiles[:3])
    ]
    corpus = _write_input(tmp_path / "c.jsonl", records)
    rows = {}
    for workers in (1, 2):  # in the decoding processes, too (a pure function of the image)
        out = tmp_path / f"out-{workers}"
        config = CleanConfig(workers=workers, chunk_size=4, image_judge={"type": "stain"})
        summary = clean(corpus, out, config, progress=False)
        assert [r["id"] for r in _rows(out / "kept.jsonl")] == ["t0", "t1", "t2"]
        assert summary["by_stage"]["image"] == len(photos)
        assert {r["reason"] for r in _rows(out / "rejected.jsonl")} == {"not H&E pathology (stain)"}
        rows[workers] = (_rows(out / "kept.jsonl"), _rows(out / "rejected.jsonl"))
    assert rows[1] == rows[2]


def test_undecodable_records_are_rejected_with_their_line_and_the_run_goes_on(tmp_path, tiles):
    def line(record_id, i, caption_prefix=""):
        return json.dumps(
            {"id": record_id, "image": str(tiles[i]), "caption": caption_prefix + HUMAN.format(i)}
        )

    good = [line(f"g{i}", i).encode() for i in range(3)]
    surrogate = (
        line("lone", 3, "bad SURROGATE ").replace("SURROGATE", "\\ud800").encode()
    )  # valid JSON, lone \ud800
    surrogate_id = line("x-SURROGATE", 4).replace("SURROGATE", "\\udfff").encode()
    latin1 = json.dumps(
        {"id": "caf\xe9", "image": str(tiles[5]), "caption": HUMAN.format(5)}, ensure_ascii=False
    )
    latin1 = latin1.encode("latin-1")  # \xe9 as one byte: not UTF-8
    corpus = tmp_path / "c.jsonl"
    deep = b"[" * 100_000 + b"]" * 100_000  # json.loads raises RecursionError, not a JSONDecodeError
    corpus.write_bytes(b"\n".join([good[0], surrogate, latin1, good[1], surrogate_id, deep, good[2]]) + b"\n")
    config = CleanConfig(workers=1, chunk_size=2)
    clean(corpus, tmp_path / "full", config, progress=False)
    kept, rejected = _rows(tmp_path / "full" / "kept.jsonl"), _rows(tmp_path / "full" / "rejected.jsonl")
    assert [r["id"] for r in kept] == ["g0", "g1", "g2"]
    assert [(r["id"], r["line"], r["stage"], r["reason"]) for r in rejected] == [
        ("lone", 2, "input", "invalid text"),
        ("line-3", 3, "input", "invalid UTF-8"),
        ("line-5", 5, "input", "invalid text"),
        ("line-6", 6, "input", "invalid JSON"),
    ]
    assert "field 'caption'" in rejected[0]["detail"] and "\\ud800" in rejected[0]["record"]
    assert "byte 0xe9" in rejected[1]["detail"] and "caf\\xe9" in rejected[1]["record"]
    assert "field 'id'" in rejected[2]["detail"]
    # killed after the first record: the resumed run passes the bad lines again and ends byte-identical
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(tmp_path / "full" / "state.json", partial)
    (partial / "kept.jsonl").write_text(
        (tmp_path / "full" / "kept.jsonl").read_text().splitlines(keepends=True)[0]
    )
    assert clean(corpus, partial, config, progress=False)["resumed_from"] == 1
    for name in ("kept.jsonl", "rejected.jsonl", "report.md"):
        assert (partial / name).read_bytes() == (tmp_path / "full" / name).read_bytes()


def test_resume_streams_earlier_outputs_instead_of_loading_them(tmp_path):
    import tracemalloc

    # 300 records of 40 KB each whose images are missing: about 12 MB of rejected.jsonl
    filler = " ".join(["haematoxylin"] * 3000)
    records = [{"id": f"r{i}", "image": f"missing/{i}.png", "caption": f"{filler} {i}"} for i in range(300)]
    corpus = _write_input(tmp_path / "c.jsonl", records)
    config = CleanConfig(workers=1)
    clean(corpus, tmp_path / "out", config, progress=False)
    assert (tmp_path / "out" / "rejected.jsonl").stat().st_size > 11_000_000
    tracemalloc.start()
    try:
        summary = clean(corpus, tmp_path / "out", config, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary["resumed_from"] == 300 and summary["by_stage"]["integrity"] == 300
    assert peak < 3_000_000  # a few lines at a time, not the 12 MB file (let alone its parsed rows)


def test_ray_engine_without_ray_is_a_clear_error(tmp_path, tiles, monkeypatch, capsys):
    corpus = _write_input(
        tmp_path / "c.jsonl", [{"id": "a", "image": str(tiles[0]), "caption": HUMAN.format(0)}]
    )
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # as if Ray were not installed
    assert (
        cli_main(["data", "clean", "--input", str(corpus), "--out", str(tmp_path / "out"), "--engine", "ray"])
        == 1
    )
    assert "needs Ray, which is not installed: pip install 'pallava[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any work
