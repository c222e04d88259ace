"""The Ray engines on a local 2-CPU Ray instance: the local engine's answers, nothing lost or repeated
under faults.

One Ray session serves the whole module. Faults are real: a worker SIGKILLs its own process (Ray restarts
it and retries its work), and a driver process is SIGKILLed and the command re-run (it resumes).
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from pallava.data.clean import CleanConfig, clean, clean_on_ray  # noqa: E402
from pallava.data.clean.judges import LexiconJudge  # noqa: E402
from pallava.slides.cohort import CohortSettings, map_cohort  # noqa: E402
from pallava.slides.mapping import load_classes  # noqa: E402
from test_data_clean import _corpus  # noqa: E402
from test_slides_cohort import OPTIONS, TEMPLATES, make_cohort  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")]
CLEAN_CONFIG = CleanConfig(workers=1, chunk_size=3)
OUTPUTS = ("kept.jsonl", "rejected.jsonl", "report.md")
WAIT = 600  # seconds a fault test waits for its driver to reach the kill point (the machine may be busy)


@pytest.fixture(scope="module")
def ray_address():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # The fault-injecting judges and loaders below travel to the workers by value (tests/ is not
    # importable there).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        ray.shutdown()


@pytest.fixture(scope="module")
def tiles(lung):
    return sorted((lung / "images" / "lung_aca").glob("*.jpeg"))[:8]


@pytest.fixture(scope="module")
def settings():
    return CohortSettings(OPTIONS, load_classes("lc25000-lung"), TEMPLATES, batch_size=2)


def _claim(marker: Path) -> bool:
    """True for exactly one caller: the one that removes the marker file."""
    try:
        marker.unlink()
        return True
    except FileNotFoundError:
        return False


class KillOnceLexicon(LexiconJudge):
    """The lexicon judge, but the worker holding it kills itself on `trigger` while `marker` exists."""

    def __init__(self, marker: Path, trigger: str) -> None:
        super().__init__()
        self.marker, self.trigger = marker, trigger
        (marker.parent / f"built-{os.getpid()}-{time.monotonic_ns()}").touch()

    def judge_texts(self, texts):
        if any(self.trigger in text for text in texts) and _claim(self.marker):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().judge_texts(texts)


class KillOnceLoader:
    """Loads PLIP; the worker kills itself at its second batch of tiles while `marker` exists."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __call__(self, model_dir, device):
        from pallava.models.plip import PlipZeroShot

        plip, marker, calls = PlipZeroShot.from_pretrained(model_dir, device), self.marker, []
        encode = plip.encode_pixels  # what `slide map` calls per batch of tiles

        def encode_pixels(pixel_values):
            calls.append(len(pixel_values))
            if len(calls) == 2 and _claim(marker):
                os.kill(os.getpid(), signal.SIGKILL)
            return encode(pixel_values)

        plip.encode_pixels = encode_pixels
        return plip


def _lines(folder: Path) -> int:
    return sum(
        len((folder / name).read_bytes().splitlines()) for name in OUTPUTS[:2] if (folder / name).exists()
    )


def _kill_driver_when(script: str, ready, tmp_path: Path) -> None:
    """Run `script` as a driver process, wait for `ready()`, then SIGKILL it."""
    path = tmp_path / "driver.py"
    path.write_text(textwrap.dedent(script))
    process = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + WAIT
        while not ready():
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the driver did not reach the kill point"
            time.sleep(0.5)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()


def test_clean_on_ray_equals_local_and_survives_a_killed_worker(ray_address, tiles, tmp_path):
    corpus = _corpus(tmp_path, tiles)
    clean(corpus, tmp_path / "local", CLEAN_CONFIG, progress=False)
    marker = tmp_path / "faults" / "kill"
    marker.parent.mkdir()
    marker.touch()
    summary = clean_on_ray(
        corpus,
        tmp_path / "ray",
        CLEAN_CONFIG,
        progress=False,
        judges={"text": lambda: KillOnceLexicon(marker, "case 7")},
    )
    assert not marker.exists() and len(list(marker.parent.glob("built-*"))) >= 2  # killed, then rebuilt
    assert summary["input"] == 16 and summary["kept"] == 7
    for name in OUTPUTS:  # every record exactly once, with the local engine's verdicts, bytes and order
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()


def test_clean_on_ray_resumes_after_the_driver_is_killed(ray_address, tiles, tmp_path):
    corpus = _corpus(tmp_path, tiles)
    clean(corpus, tmp_path / "local", CLEAN_CONFIG, progress=False)
    out = tmp_path / "ray"
    # The driver SIGKILLs itself halfway through writing its eighth output line.
    script = tmp_path / "driver.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, signal
        from pallava.data.clean import CleanConfig, clean_on_ray, pipeline

        written, append = [], pipeline.AppendOnlyJsonl.append

        def append_then_die(self, record):
            if len(written) == 7:
                self._handle.write(pipeline.json.dumps(dict(record))[:40])
                self._handle.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            written.append(record)
            append(self, record)

        pipeline.AppendOnlyJsonl.append = append_then_die
        config = CleanConfig(workers=1, chunk_size=3)
        clean_on_ray({str(corpus)!r}, {str(out)!r}, config, progress=False, address={ray_address!r})
        """)
    )
    driver = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=WAIT)
    assert driver.returncode == -signal.SIGKILL, driver.stderr[-3000:]
    assert _lines(out) == 8  # seven whole lines and a torn one
    summary = clean_on_ray(corpus, out, CLEAN_CONFIG, progress=False)
    assert summary["resumed_from"] == 7
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (tmp_path / "local" / name).read_bytes()


def _assert_same_maps(ray_out: Path, local_out: Path, slide_ids) -> None:
    """Per-slide outputs equal: summaries, GeoJSON (numbers within float tolerance), embeddings once each."""

    def close(a, b):
        if isinstance(a, dict):
            assert a.keys() == b.keys()
            for key in a:
                close(a[key], b[key])
        elif isinstance(a, list):
            assert len(a) == len(b)
            for x, y in zip(a, b, strict=True):
                close(x, y)
        elif isinstance(a, float):
            assert a == pytest.approx(b, abs=2e-4)
        else:
            assert a == b

    for slide_id in slide_ids:
        ray_dir, local_dir = ray_out / "slides" / slide_id, local_out / "slides" / slide_id
        assert sorted(p.name for p in ray_dir.iterdir()) == sorted(p.name for p in local_dir.iterdir())
        for name in ("summary.json", "tiles.geojson"):
            close(json.loads((ray_dir / name).read_text()), json.loads((local_dir / name).read_text()))
        embeddings = []
        for folder in (ray_dir, local_dir):
            parts = [np.load(p) for p in sorted((folder / "embeddings").glob("part-*.npz"))]
            boxes = np.concatenate([p["boxes"] for p in parts])
            vectors = np.concatenate([p["vectors"] for p in parts])
            assert len(np.unique(boxes, axis=0)) == len(boxes)  # no tile embedded twice
            order = np.lexsort(boxes.T[::-1])
            embeddings.append((boxes[order], vectors[order]))
        np.testing.assert_array_equal(embeddings[0][0], embeddings[1][0])
        np.testing.assert_allclose(embeddings[0][1], embeddings[1][1], atol=1e-5)
    assert (ray_out / "cohort.csv").read_text().replace("done earlier", "mapped") == (
        local_out / "cohort.csv"
    ).read_text()


def test_cohort_on_ray_equals_local_and_survives_a_killed_worker(
    ray_address, svs, tiny_plip_dir, tmp_path, settings
):
    cohort = make_cohort(tmp_path, svs)
    local = map_cohort(cohort, tiny_plip_dir, tmp_path / "local", settings)
    marker = tmp_path / "kill"
    marker.touch()
    rows = map_cohort(
        cohort, tiny_plip_dir, tmp_path / "ray", settings, engine="ray", load_model=KillOnceLoader(marker)
    )
    assert not marker.exists()  # a worker died mid-slide, and its slide was retried
    assert [(r["id"], r["status"]) for r in rows] == [
        ("first", "mapped"),
        ("second", "mapped"),
        ("truncated", "failed"),
    ]
    assert rows == local
    _assert_same_maps(tmp_path / "ray", tmp_path / "local", ("first", "second"))


def test_cohort_on_ray_resumes_after_the_driver_is_killed(
    ray_address, svs, tiny_plip_dir, tmp_path, settings
):
    cohort = make_cohort(tmp_path, svs)
    local = map_cohort(cohort, tiny_plip_dir, tmp_path / "local", settings)
    batches = -(-local[0]["tiles"] // settings.batch_size)
    out, flag = tmp_path / "ray", tmp_path / "blocked"
    # One worker: the first slide is finished, then the driver is killed while the second is being embedded.
    _kill_driver_when(
        f"""
        import time
        from pathlib import Path
        from pallava.models.plip import PlipZeroShot
        from pallava.slides.cohort import CohortSettings, map_cohort
        from pallava.slides.mapping import TilingOptions, load_classes

        def load(model_dir, device):
            plip, calls = PlipZeroShot.from_pretrained(model_dir, device), []
            encode = plip.encode_pixels

            def hang_on_second_slide(pixel_values):
                calls.append(1)
                if len(calls) > {batches}:
                    Path({str(flag)!r}).touch()
                    time.sleep(3600)
                return encode(pixel_values)

            plip.encode_pixels = hang_on_second_slide
            return plip

        options = TilingOptions{tuple(vars(OPTIONS).values())!r}
        settings = CohortSettings(options, load_classes("lc25000-lung"),
                                  {TEMPLATES!r}, batch_size={settings.batch_size})
        map_cohort({str(cohort)!r}, {str(tiny_plip_dir)!r}, {str(out)!r}, settings, engine="ray",
                   ray_address={ray_address!r}, workers=1, load_model=load)
        """,
        flag.exists,
        tmp_path,
    )
    assert (out / "slides" / "first" / "summary.json").is_file()
    assert not (out / "slides" / "second" / "summary.json").exists()
    rows = map_cohort(cohort, tiny_plip_dir, out, settings, engine="ray")
    assert [r["status"] for r in rows] == ["done earlier", "mapped", "failed"]
    _assert_same_maps(out, tmp_path / "local", ("first", "second"))
