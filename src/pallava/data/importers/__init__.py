"""Importers: one module per public format, each validating its input and naming file, record and field.

`import_records(format, path, ...)` dispatches by format name (the names `pallava data import` accepts).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pallava.data.importers.captions import read_caption_json, read_pmc_oa_jsonl, read_quilt_csv
from pallava.data.importers.conversations import read_llava
from pallava.data.importers.manifest import read_image_folder, read_manifest
from pallava.data.importers.pathvqa import read_pathvqa_json, read_pathvqa_parquet, read_pathvqa_pickle
from pallava.data.importers.pmcvqa import read_pmc_vqa

FORMATS: dict[str, str] = {
    "caption-json": "authors' caption JSON: [{image, caption}]",
    "quilt": "Quilt-1M lookup CSV (image_path, caption, ...)",
    "pmc-oa": "PMC-OA JSONL ({image, caption, pmcid, url_name} per line)",
    "llava": "LLaVA conversations, JSON list or JSONL",
    "pathvqa-parquet": "PathVQA from the Hugging Face hub (Parquet: image {bytes, path}, question, answer)",
    "pathvqa-pickle": "PathVQA original pickles (list of {img_id, sent, label} or {image, question, answer})",
    "pathvqa-json": "PathVQA text JSON ({img_id, sentf.pvqa, labelf.pvqa})",
    "pmc-vqa": "PMC-VQA CSV (Figure_path, Caption, Question, Choice A..D, Answer, split)",
    "manifest": "labelled-image CSV (path, label[, cluster, split])",
    "image-folder": "labelled images as root/<class>/<image>",
}


def import_records(
    fmt: str,
    path: str | Path,
    image_root: str | Path | None = None,
    image_dir: str | Path | None = None,
    split: str | None = None,
) -> Iterator[Any]:
    """Stream records of one format. `image_root` prefixes relative image paths; `image_dir` receives
    images embedded in Parquet; `split` filters formats that carry one (manifest, pmc-vqa)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    if not path.exists():
        raise ValueError(f"{path}: input not found")
    if split is not None and fmt not in ("manifest", "pmc-vqa"):
        raise ValueError(f"format '{fmt}' has no split column; drop the split option")
    if fmt == "caption-json":
        return read_caption_json(path, image_root)
    if fmt == "quilt":
        return read_quilt_csv(path, image_root)
    if fmt == "pmc-oa":
        return read_pmc_oa_jsonl(path, image_root)
    if fmt == "llava":
        return read_llava(path, image_root)
    if fmt == "pathvqa-parquet":
        return read_pathvqa_parquet(path, image_dir)
    if fmt == "pathvqa-pickle":
        return read_pathvqa_pickle(path, image_root)
    if fmt == "pathvqa-json":
        return read_pathvqa_json(path, image_root)
    if fmt == "pmc-vqa":
        return read_pmc_vqa(path, image_root, split)
    if fmt == "manifest":
        return iter(read_manifest(path, split))
    return iter(read_image_folder(path))


__all__ = [
    "FORMATS",
    "import_records",
    "read_caption_json",
    "read_image_folder",
    "read_llava",
    "read_manifest",
    "read_pathvqa_json",
    "read_pathvqa_parquet",
    "read_pathvqa_pickle",
    "read_pmc_oa_jsonl",
    "read_pmc_vqa",
    "read_quilt_csv",
]
