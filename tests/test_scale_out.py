"""How the Ray engines split and place work, checked without Ray: byte ranges, operators, pool sizes."""

import pickle

import pytest

from pallava.data.clean import CleanConfig
from pallava.data.clean.pipeline import _scan_input
from pallava.data.clean.ray_engine import _Decode, input_ranges, judge_resources, operator_stages
from pallava.slides.cohort import pool_size

CPU_ONLY, TWO_GPUS = {"CPU": 8.0, "GPU": 0.0}, {"CPU": 16.0, "GPU": 2.0}


def test_byte_ranges_read_back_exactly_the_local_scanners_records(tmp_path):
    lines = [b'{"id": "a", "caption": "x"}', b"", b'{"id": "b"}\r', b"   ", b"{not json", b'{"id": "\xe9"}',
             b'{"id": "c"}', b'{"id": "d"}']  # fmt: skip
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines))  # no newline after the last line
    expected = [(e.line, e.id, e.raw, e.rejection) for e in _scan_input(path)]
    for chunk_size in (1, 2, 4, 100):
        for first_line in (1, 3, 7):
            got = []
            for row in input_ranges(path, first_line, chunk_size):
                entries = pickle.loads(_Decode(str(path), CleanConfig(workers=1))(row)["entries"])
                assert 1 <= len(entries) <= chunk_size
                got += [(e.line, e.id, e.raw, e.rejection) for e in entries]
            # the records from `first_line` on, each once, in order, with the scanner's input rejections
            # (decoding then rejects more: records of no known type, missing images)
            want = [(line, i, raw, r) for line, i, raw, r in expected if line >= first_line]
            assert [g[:3] for g in got] == [w[:3] for w in want]
            assert all(w[3] is None or g[3] == w[3] for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize(
    ("config", "groups"),
    [
        (CleanConfig(), [["image"], ["text", "length"]]),
        (CleanConfig(image_judge={"type": "stain"}), [[], ["image"], ["text", "length"]]),
        (
            CleanConfig(
                stages=["integrity", "length", "text", "image", "duplicate"], image_judge={"type": "stain"}
            ),
            [["length"], ["text"], ["image"]],
        ),
        (CleanConfig(text_judge={"type": "none"}), [["image", "text", "length"]]),
    ],
)
def test_model_free_stages_join_the_operator_before_them(config, groups):
    assert operator_stages(config) == groups


def test_judges_and_slide_workers_are_placed_by_the_clusters_resources():
    plip = {"type": "plip", "model_dir": "p"}
    assert judge_resources(plip, TWO_GPUS) == (
        {"num_cpus": 1, "num_gpus": 1, "concurrency": (1, 2)},
        {**plip, "device": "cuda"},
    )
    assert judge_resources({**plip, "device": "cpu"}, TWO_GPUS)[0] == {"num_cpus": 1.0, "concurrency": (1, 8)}
    assert judge_resources(plip, CPU_ONLY) == ({"num_cpus": 1.0, "concurrency": (1, 4)}, plip)
    assert judge_resources({"type": "openai"}, CPU_ONLY)[0] == {"num_cpus": 0.25, "concurrency": (1, 16)}
    assert judge_resources({"type": "lexicon"}, {"CPU": 1.0, "GPU": 0.0})[0]["concurrency"] == (1, 1)
    # a config's device is operational: it may change between a run and its resume
    assert (
        CleanConfig(image_judge={**plip, "device": "cuda"}).decision_fields()
        == CleanConfig(image_judge=plip).decision_fields()
    )

    assert pool_size(TWO_GPUS, slides=10) == (2, {"num_cpus": 1, "num_gpus": 1})
    assert pool_size(CPU_ONLY, slides=10) == (8, {"num_cpus": 1, "num_gpus": 0})
    assert pool_size(CPU_ONLY, slides=3) == (3, {"num_cpus": 1, "num_gpus": 0})
    assert pool_size(CPU_ONLY, slides=10, workers=2)[0] == 2


def test_a_judge_worker_gets_the_drivers_model_loaders(tiny_plip_dir, lung_tiles, monkeypatch, tmp_path):
    from pallava.data.clean import judges
    from pallava.data.clean.ray_engine import _Judge
    from pallava.models.plip import PlipZeroShot

    config = CleanConfig(image_judge={"type": "plip", "model_dir": str(tiny_plip_dir)})
    monkeypatch.setattr(judges, "SCORER_LOADERS", {})  # a fresh worker: pallava.models.plip never imported
    monkeypatch.setattr("pallava.data.clean.ray_engine.SCORER_LOADERS", judges.SCORER_LOADERS)
    with pytest.raises(ValueError, match="no loader for PLIP folders is registered"):
        _Judge(str(tmp_path / "in.jsonl"), config, ["image"])
    worker = _Judge(
        str(tmp_path / "in.jsonl"), config, ["image"], loaders={"plip": PlipZeroShot.from_pretrained}
    )
    (verdict,) = worker.cleaner.image_judge.judge_images(lung_tiles[:1])
    assert verdict.detail.startswith("p") and not verdict.error
