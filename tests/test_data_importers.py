"""Importers on a small fixture in each public format, the real PathVQA text, and malformed inputs."""

import csv
import io
import json
import os
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pallava.cli import main as cli_main
from pallava.data.importers import (
    import_records,
    read_caption_json,
    read_llava,
    read_pathvqa_json,
    read_pathvqa_parquet,
    read_pathvqa_pickle,
    read_pmc_oa_jsonl,
    read_pmc_vqa,
    read_quilt_csv,
)
from pallava.data.importers.pathvqa import load_pickle_safely
from pallava.data.records import VQAItem

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_caption_json_quilt_pmc_oa(tmp_path):
    pairs = list(read_caption_json(FIXTURES / "pcaption.json", image_root="/data"))
    assert [p.image for p in pairs] == ["/data/images/quilt_0001.jpg", "/data/images/pmc_0002.jpg"]
    assert pairs[0].caption.startswith("Low-power view") and pairs[0].id == "pcaption:pcaption:0"
    quilt = list(read_quilt_csv(FIXTURES / "quilt_1M_lookup.csv"))
    assert [q.image for q in quilt] == ["xy3Kq_0.jpg", "aB9_c1.jpg"]
    assert quilt[0].meta["subset"] == "quilt" and "" not in quilt[0].meta and quilt[1].source == "quilt"
    oa = list(read_pmc_oa_jsonl(FIXTURES / "pmc_oa.jsonl"))
    assert (
        oa[0].meta == {"pmcid": "PMC212319", "url_name": "1471-2121-4-13-3.jpg"}
        and oa[1].id == "pmc-oa:pmc_oa:2"
    )


def test_llava_json_and_jsonl_agree():
    from_json = list(read_llava(FIXTURES / "llava.json"))
    from_jsonl = list(read_llava(FIXTURES / "llava.jsonl"))
    assert from_json == from_jsonl and len(from_json) == 3
    assert from_json[2].image is None and len(from_json[1].conversations) == 4


def test_pathvqa_parquet_extracts_each_image_once(tmp_path):
    items = list(read_pathvqa_parquet(FIXTURES / "pathvqa-train-00000-of-00001.parquet", tmp_path / "img"))
    assert [(i.answer_type, i.answer) for i in items] == [
        ("closed", "yes"),
        ("open", "keratin pearls"),
        ("closed", "no"),
    ]
    assert items[0].image == items[1].image != items[2].image
    assert len(list((tmp_path / "img").iterdir())) == 2
    assert Image.open(items[2].image).size == (8, 8)
    with pytest.raises(ValueError, match="give an image folder"):
        list(read_pathvqa_parquet(FIXTURES / "pathvqa-train-00000-of-00001.parquet"))


def test_pathvqa_pickle_lxmert_form():
    items = list(read_pathvqa_pickle(FIXTURES / "pathvqa_train_vqa.pkl", image_root="/pvqa/images/train"))
    assert items[0] == VQAItem(
        "pathvqa:pathvqa_train_vqa:100422000",
        "/pvqa/images/train/train_0422.jpg",
        "Are the endothelial cells swollen?",
        "yes",
        "closed",
        None,
        {"source": "pathvqa"},
    )
    assert items[1].answer == "neutrophils" and items[1].answer_type == "open"


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_loader_refuses_code(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps([_Exploit()]))
    with pytest.raises(
        ValueError, match=r"evil.pkl: cannot load pickle safely: refusing to load 'posix.system'"
    ):
        list(read_pathvqa_pickle(path))
    (tmp_path / "ok.pkl").write_bytes(pickle.dumps({"a": {1, 2}, "b": ("x", 1.5)}, protocol=2))
    assert load_pickle_safely(tmp_path / "ok.pkl") == {"a": {1, 2}, "b": ("x", 1.5)}


def test_pathvqa_text_json_real_file():
    path = SHARED / "pathvqa-text" / "pvqa_test.json"
    if not path.is_file():
        pytest.skip("shared data not available")
    items = list(read_pathvqa_json(path))
    assert len(items) == 6761
    closed = [i for i in items if i.answer_type == "closed"]
    assert {i.answer for i in closed} == {"yes", "no"} and 0.4 < len(closed) / len(items) < 0.6
    assert len({i.id for i in items}) == len(items) and len({i.image for i in items}) == 858


def test_pmc_vqa_strips_prefixes_and_resolves_letters():
    items = list(read_pmc_vqa(FIXTURES / "pmc_vqa.csv"))
    assert items[0].options == [
        "Diffuse uptake pattern",
        "Focal uptake pattern",
        "No uptake pattern",
        "Cannot determine from the information given",
    ]
    assert [i.answer for i in items] == ["B", "D"] and all(i.answer_type == "choice" for i in items)
    assert items[0].meta["caption"] == "Histology of the resected breast mass."
    assert [i.id for i in read_pmc_vqa(FIXTURES / "pmc_vqa.csv", split="test")] == ["pmc-vqa:pmc_vqa:3"]


def _parquet(path, rows, columns=("image", "question", "answer")):
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    data = {
        "image": pa.array([r[0] for r in rows], type=struct),
        "question": [r[1] for r in rows],
        "answer": [r[2] for r in rows],
    }
    pq.write_table(pa.table({c: data[c] for c in columns}), path)
    return path


def _text(path, text):
    path.write_text(text)
    return path


def _bytes(path, data):
    path.write_bytes(data)
    return path


def _csv(path, header, *rows):
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    return path


PMC_HEADER = [
    "Figure_path",
    "Caption",
    "Question",
    "Choice A",
    "Choice B",
    "Choice C",
    "Choice D",
    "Answer",
    "split",
]


@pytest.mark.parametrize(
    ("make", "reader", "message"),
    [
        (lambda p: _text(p, '[{"image": "a.jpg"}]'), read_caption_json, r"record 0: field 'caption'"),
        (lambda p: _text(p, '{"image": "a.jpg"}'), read_caption_json, r"expected a JSON list"),
        (
            lambda p: _text(p, '[{"image": "a.jpg", "caption": '),
            read_caption_json,
            r"not valid JSON \(line 1",
        ),
        (lambda p: _csv(p, ["caption", "path"], ["c", "a.jpg"]), read_quilt_csv, r"missing \['image_path'\]"),
        (
            lambda p: _csv(p, ["caption", "image_path"], ["c", "a.jpg"], ["", "b.jpg"]),
            read_quilt_csv,
            r"row 3: field 'caption'",
        ),
        (
            lambda p: _text(p, '{"image": "a", "caption": "c"}\n[1]\n'),
            read_pmc_oa_jsonl,
            r"line 2: expected a JSON object",
        ),
        (
            lambda p: _text(p, '{"image": "a", "caption": "c"}\n{"image": 5, "caption": "c"}\n'),
            read_pmc_oa_jsonl,
            r"line 2: field 'image'",
        ),
        (
            lambda p: _text(
                p, '{"id": "x", "image": "a.jpg", "conversations": [{"from": "gpt", "value": "<image>"}]}\n'
            ),
            read_llava,
            r"line 1: conversations\[0\].from must be 'human'",
        ),
        (
            lambda p: _text(
                p, '{"id": "x", "image": "a.jpg", "conversations": [{"from": "human", "value": "hi"}]}\n'
            ),
            read_llava,
            r"line 1: field 'conversations' must hold exactly one <image>",
        ),
        (
            lambda p: _text(
                p,
                '{"id": "x", "conversations": [{"from": "human", "value": "q"}, '
                '{"from": "human", "value": "q"}]}\n',
            ),
            read_llava,
            r"conversations\[1\].from repeats",
        ),
        (
            lambda p: _text(p, '{"id": "x", "image": "a.jpg"}\n'),
            read_llava,
            r"line 1: .*missing field 'conversations'",
        ),
        (
            lambda p: _parquet(p, [({"bytes": None, "path": None}, "q", "a")]),
            lambda p: read_pathvqa_parquet(p, p.parent),
            r"row 0: field 'image' has neither",
        ),
        (
            lambda p: _parquet(p, [({"bytes": None, "path": "x.jpg"}, "q", "")]),
            lambda p: read_pathvqa_parquet(p, p.parent),
            r"row 0: field 'answer'",
        ),
        (
            lambda p: _parquet(p, [({"bytes": None, "path": "x.jpg"}, "q", "a")], ("image", "answer")),
            lambda p: read_pathvqa_parquet(p, p.parent),
            r"missing \['question'\]",
        ),
        (
            lambda p: _bytes(p, b"not parquet"),
            lambda p: read_pathvqa_parquet(p, p.parent),
            r"not a readable Parquet",
        ),
        (
            lambda p: _bytes(p, pickle.dumps([{"img_id": "t1", "sent": "q", "label": {}}])),
            read_pathvqa_pickle,
            r"record 0: field 'label'",
        ),
        (lambda p: _bytes(p, pickle.dumps({"a": 1})), read_pathvqa_pickle, r"expected a list"),
        (lambda p: _bytes(p, b"\x80\x04garbage"), read_pathvqa_pickle, r"cannot load pickle safely"),
        (
            lambda p: _text(
                p,
                json.dumps(
                    [{"img_id": "t1", "sentf": {"pvqa": ["q1", "q2"]}, "labelf": {"pvqa": [{"yes": 1}]}}]
                ),
            ),
            read_pathvqa_json,
            r"record 0: fields 'sentf.pvqa' \(2\) and 'labelf.pvqa' \(1\) differ",
        ),
        (
            lambda p: _text(p, json.dumps([{"sentf": {"pvqa": []}, "labelf": {"pvqa": []}}])),
            read_pathvqa_json,
            r"record 0: field 'img_id'",
        ),
        (
            lambda p: _csv(p, PMC_HEADER[:5]),
            read_pmc_vqa,
            r"missing columns \['Choice C', 'Choice D', 'Answer'\]",
        ),
        (
            lambda p: _csv(p, PMC_HEADER, ["f.jpg", "", "q", "A:a", "B:b", "C:c", "D:d", "zzz", "train"]),
            read_pmc_vqa,
            r"row 2: field 'Answer' 'zzz' matches no choice",
        ),
        (
            lambda p: _csv(p, PMC_HEADER, ["f.jpg", "", "q", "A:a", "C:b", "C:c", "D:d", "A", "train"]),
            read_pmc_vqa,
            r"row 2: field 'Choice B' is labelled 'C'",
        ),
        (
            lambda p: _csv(p, PMC_HEADER, ["", "", "q", "A:a", "B:b", "C:c", "D:d", "A", "train"]),
            read_pmc_vqa,
            r"row 2: field 'Figure_path' is empty",
        ),
    ],
)
def test_malformed_input_names_file_record_field(tmp_path, make, reader, message):
    path = make(tmp_path / "input.dat")
    with pytest.raises(ValueError, match=message) as info:
        list(reader(path))
    assert "input.dat" in str(info.value)


def test_import_dispatch_and_cli(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown format 'nope'"):
        import_records("nope", FIXTURES / "pmc_vqa.csv")
    with pytest.raises(ValueError, match="has no split column"):
        import_records("quilt", FIXTURES / "quilt_1M_lookup.csv", split="train")
    out = tmp_path / "pvqa.jsonl"
    assert (
        cli_main(
            [
                "data",
                "import",
                "--format",
                "pathvqa-parquet",
                "--input",
                str(FIXTURES / "pathvqa-train-00000-of-00001.parquet"),
                "--image-dir",
                str(tmp_path / "img"),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [VQAItem.from_dict(r).answer for r in rows] == ["yes", "keratin pearls", "no"]
    assert "wrote 3 records" in capsys.readouterr().out
    assert (
        cli_main(
            [
                "data",
                "import",
                "--format",
                "pmc-vqa",
                "--input",
                str(tmp_path / "missing.csv"),
                "--out",
                str(out),
            ]
        )
        == 1
    )
    assert "missing.csv: input not found" in capsys.readouterr().err


def test_image_bytes_roundtrip_suffix(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="JPEG")
    path = _parquet(tmp_path / "j.parquet", [({"bytes": buffer.getvalue(), "path": "x.bin"}, "q", "a")])
    (item,) = read_pathvqa_parquet(path, tmp_path / "img")
    assert item.image.endswith(".jpg")
