"""Quickstart data: the datasets' manifests (or a smoke subset) and the cleaned caption corpus, with
contaminants the cleaning must reject."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from pallava.quickstart.runner import StepRunner

# Captions that describe animal tissue: the text judge must reject them (paper: non-human pathology removed).
NON_HUMAN_CAPTIONS = (
    "Haematoxylin and eosin section of mouse lung from a transgenic model, showing alveolar walls thickened "
    "by "
    "inflammatory cells and a small adenoma at the periphery of the lobe.",
    "Histology of rat lung after experimental exposure: the bronchioles are lined by hyperplastic "
    "epithelium and "
    "the surrounding alveoli contain foamy macrophages and scattered neutrophils.",
    "Canine pulmonary carcinoma from a veterinary biopsy, with atypical glandular structures invading the "
    "interstitium of the dog's lung and a desmoplastic stromal reaction around them.",
)
PHOTO_CAPTION = (
    "A photograph that a careless scraper collected together with pathology figures; it shows {what} and "
    "contains no stained tissue section, no microscope field and no histology at all."
)


class CorpusSteps(StepRunner):
    # --- data ---------------------------------------------------------------------------------------
    def manifests(self) -> dict[str, Path]:
        """Each dataset's labelled manifest by name: the real ones, or (smoke) a few images per class and
        split."""
        from pallava.data.datasets import parse_data_args

        datasets = parse_data_args([str(path) for path in self.s.data]).datasets
        for spec in datasets:
            if not spec.path.endswith(".csv"):
                raise FileNotFoundError(
                    f"no manifest at {spec.path}: pass --data DIR holding manifest.csv "
                    "(path,label,cluster,split); "
                    "see README, 'Your own data'"
                )
        if not self.s.smoke:
            return {spec.name: Path(spec.path) for spec in datasets}
        return {spec.name: self.smoke_subset(spec.name, Path(spec.path)) for spec in datasets}

    def smoke_subset(self, name: str, source: Path) -> Path:
        """4 train and 2 dev images per class of one manifest (absolute paths), in OUT/data/<name>/."""
        subset = self.out / "data" / name / "manifest.csv"
        if subset.is_file():
            return subset
        with source.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        keep, counts = [], {}
        for row in rows:
            key = (row["label"], row.get("split", ""))
            limit = 4 if row.get("split") == "train" else 2
            if counts.get(key, 0) < limit:
                counts[key] = counts.get(key, 0) + 1
                keep.append({**row, "path": str((source.parent / row["path"]).resolve())})
        subset.parent.mkdir(parents=True, exist_ok=True)
        with subset.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(keep[0]))
            writer.writeheader()
            writer.writerows(keep)
        return subset

    def data_args(self, manifests: dict[str, Path]) -> list[str]:
        """`--input M` per dataset (each manifest's folder names its dataset) and the label map, if one is
        set."""
        args = [str(arg) for manifest in manifests.values() for arg in ("--input", manifest)]
        return args + (["--labels", self.s.labels] if self.s.labels else [])

    def build_corpus(self, manifests: dict[str, Path]) -> dict:
        corpus = self.out / "corpus"
        corpus.mkdir(parents=True, exist_ok=True)
        captions = corpus / "captions.jsonl"
        self.run_command(
            "data",
            "build",
            "--kind",
            "captions",
            *self.data_args(manifests),
            "--split",
            "train",
            "--seed",
            self.s.seed,
            "--out",
            captions,
        )
        records = [json.loads(line) for line in captions.read_text().splitlines() if line.strip()]
        records += self.contaminants(records, corpus)
        raw = corpus / "raw.jsonl"
        raw.write_text("".join(json.dumps(r) + "\n" for r in records))
        config = corpus / "clean.yaml"
        config.write_text(
            "# quickstart cleaning: the paper's stages; H&E stain judge for images, lexicon judge for text\n"
            "image_judge: {type: stain}\ntext_judge: {type: lexicon}\nmin_words: 20\n"
        )
        self.run_command("data", "clean", "--input", raw, "--out", corpus / "clean", "--config", config)
        kept = sum(1 for line in (corpus / "clean" / "kept.jsonl").read_text().splitlines() if line.strip())
        rejected = sum(
            1 for line in (corpus / "clean" / "rejected.jsonl").read_text().splitlines() if line.strip()
        )
        return {"input": len(records), "kept": kept, "rejected": rejected}

    def contaminants(self, records: list[dict], corpus: Path) -> list[dict]:
        """Records the cleaning must reject: photographs, non-human captions and a corrupt file."""
        extra = []
        photos = self.s.samples / "non-pathology"
        for path in sorted(photos.glob("*")) if photos.is_dir() else []:
            what = path.stem.replace("_", " ")
            extra.append(
                {
                    "id": f"photo-{path.stem}",
                    "image": str(path.resolve()),
                    "caption": PHOTO_CAPTION.format(what=f"a {what}"),
                    "source": "contaminant",
                }
            )
        rng = random.Random(self.s.seed)
        for index, caption in enumerate(NON_HUMAN_CAPTIONS):
            host = rng.choice(records)
            extra.append(
                {
                    "id": f"non-human-{index}",
                    "image": host["image"],
                    "caption": caption,
                    "source": "contaminant",
                }
            )
        corrupt = corpus / "corrupt.jpg"
        corrupt.write_bytes(b"\xff\xd8\xff\xe0 truncated download")
        extra.append(
            {
                "id": "corrupt-file",
                "image": str(corrupt),
                "caption": PHOTO_CAPTION.format(what="nothing"),
                "source": "contaminant",
            }
        )
        return extra
