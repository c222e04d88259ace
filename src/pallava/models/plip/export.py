"""Export of a trained PLIP vision tower as a standalone `CLIPVisionModel` folder for the assistant."""

from __future__ import annotations

from pathlib import Path

from pallava.models.plip.modeling_plip import PlipModel


def export_vision_tower(plip_dir: str | Path, out_dir: str | Path) -> Path:
    """Write config.json + model.safetensors of the PLIP vision tower; load it with
    `CLIPVisionModel.from_pretrained`."""
    plip_dir, out = Path(plip_dir), Path(out_dir)
    if not (plip_dir / "config.json").is_file():
        raise ValueError(f"{plip_dir}: not a PLIP model folder (no config.json)")
    model = PlipModel.from_pretrained(str(plip_dir), trust_remote_code=False)
    model.vision_model.save_pretrained(out)
    return out
