"""Zero-shot use of a trained PLIP: image/text embeddings, prompt-ensemble classification, retrieval recall.

Slide heat maps and the data-cleaning image judge build on `PlipZeroShot`.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pallava.cpu import native_bf16_autocast
from pallava.data.labels import LabelMap
from pallava.files import read_json_object
from pallava.models.plip.configuration_plip import PlipConfig
from pallava.models.plip.modeling_plip import PlipModel
from pallava.models.plip.prompts import ZEROSHOT_HEADS, ZEROSHOT_TEMPLATES, class_prompts
from pallava.processing.image import normalize_to_tensor
from pallava.processing.loading import DEFAULT_MAX_PIXELS, ImageSource, load_normalized
from pallava.processing.stain_norm import recorded_stain_normalize


class PlipZeroShot:
    """A PLIP model and tokenizer in eval mode, with batched encoders and prompt-ensemble classification."""

    def __init__(
        self, model: PlipModel, tokenizer: PreTrainedTokenizerBase, device: str | torch.device = "cpu"
    ):
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        # e.g. "macenko": images mapped onto reference H&E stains, as the tower was trained (its config says)
        self.stain_normalize: str | None = recorded_stain_normalize(model.config.vision_config)
        self.max_pixels: int | None = DEFAULT_MAX_PIXELS  # a larger image is refused before it is decoded
        # Class prompt ensembles already encoded: a cohort of slides, or a server, asks for the same classes
        # again and again, and the paper's text tower takes seconds for them on a CPU.
        self._class_embeddings: dict[tuple[tuple[str, ...], ...], torch.Tensor] = {}
        # shares_tower's weight comparisons, per tower object (weak: a freed tower's id may be reused)
        self._same_weights: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str | torch.device = "cpu") -> PlipZeroShot:
        """Load a PLIP folder written by `save_pretrained` (config, weights and tokenizer)."""
        path = Path(model_dir)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{path}: not a PLIP model folder (no config.json)")
        model_type = read_json_object(config_file).get("model_type")
        if model_type != PlipConfig.model_type:  # any other model would load with random PLIP weights
            raise ValueError(
                f"{path} is not a PLIP model folder: its config.json has model_type {model_type!r}, "
                f"expected {PlipConfig.model_type!r} (a folder written by `pallava plip train`)"
            )
        try:
            model, info = PlipModel.from_pretrained(
                str(path), trust_remote_code=False, output_loading_info=True
            )
        except (OSError, RuntimeError) as error:  # no weights file, a corrupt one, or other shapes
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ValueError(f"{path}: cannot load the PLIP weights ({reason})") from None
        missing = sorted(info["missing_keys"]) + sorted(key for key, *_ in info["mismatched_keys"])
        if missing:
            raise ValueError(
                f"{path}: its weights do not fill the PLIP model: missing {', '.join(missing[:3])}"
                f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}"
            )
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        return cls(model, tokenizer, device)

    def pixels(self, image: ImageSource) -> torch.Tensor:
        """One image as the encoder takes it (3, S, S): loaded, stain-normalised if set, CLIP-normalised.

        Thread-safe: `slide map`'s tile readers call it, preparing the next batch while this one is encoded.
        """
        image = load_normalized(image, self.stain_normalize, self.max_pixels)
        return normalize_to_tensor(image, self.model.image_size)

    @torch.no_grad()
    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings (N, D) for CLIP-normalised pixels (N, 3, S, S)."""
        return self.model.get_image_features(pixel_values.to(self.device)).float().cpu()

    def shares_tower(self, tower: torch.nn.Module, image_size: int) -> bool:
        """Whether `tower` (e.g. an assistant's vision tower, exported from this PLIP) holds this PLIP's
        vision weights (same dtype) and reads images of the same size: then `embed_tokens` of its post-normed
        last-layer tokens gives `encode_pixels`' embedding without a second pass through the tower.
        The weights are compared once per tower object (a frozen tower: later changes to it go unseen)."""
        if self.model.image_size != image_size:
            return False
        if tower not in self._same_weights:
            mine, theirs = self.model.vision_model.state_dict(), tower.state_dict()
            self._same_weights[tower] = mine.keys() == theirs.keys() and all(
                mine[name].shape == theirs[name].shape
                and mine[name].dtype == theirs[name].dtype
                and torch.equal(mine[name].to(theirs[name].device), theirs[name])
                for name in mine
            )
        return self._same_weights[tower]

    @torch.no_grad()
    def embed_tokens(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings (N, D) from a tower's post-normed last-layer tokens (N, 1+P, width),
        pooled as this PLIP pools ([CLS] or the patch mean)."""
        dtype = self.model.vision_proj.weight.dtype
        return self.model.image_embeds(image_tokens.to(self.device, dtype)).float().cpu()

    @torch.no_grad()
    def encode_images(
        self, images: Sequence[ImageSource], batch_size: int = 64, progress: bool = False
    ) -> torch.Tensor:
        """Normalised image embeddings (N, D); images are PIL images, paths or arrays."""
        embeddings = self._in_batches(images, batch_size, progress, self.encode_pixels)
        return embeddings if embeddings is not None else torch.empty(0, self.model.config.embed_dim)

    @torch.no_grad()
    def encode_image_tokens(
        self, images: Sequence[ImageSource], batch_size: int = 64, progress: bool = False
    ) -> torch.Tensor:
        """The vision tower's post-normed last-layer tokens (N, 1+P, width), what the ITM head reads."""
        tokens = self._in_batches(
            images,
            batch_size,
            progress,
            lambda pixels: self.model.image_tokens(pixels.to(self.device)).float().cpu(),
        )
        return tokens if tokens is not None else torch.empty(0)

    def _in_batches(
        self, images: Sequence[ImageSource], batch_size: int, progress: bool, encode
    ) -> torch.Tensor | None:
        """`encode` of the images' pixels, batch by batch, concatenated; None for no images."""
        chunks = []
        for start in tqdm(range(0, len(images), batch_size), desc="encoding images", disable=not progress):
            batch = images[start : start + batch_size]
            chunks.append(encode(torch.stack([self.pixels(image) for image in batch])))
        return torch.cat(chunks) if chunks else None

    def _tokenize(self, texts: Sequence[str]):
        return self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.model.config.max_text_length,
            return_tensors="pt",
        ).to(self.device)

    @torch.no_grad()
    def match_scores(
        self, image_tokens: torch.Tensor, class_texts: Sequence[Sequence[str]], max_pairs: int = 256
    ) -> torch.Tensor:
        """(N, C) the ITM head's verdict on each image and class: the mean over the class's prompts of the
        match log-odds (logit "match" minus logit "no match"). The head cross-attends to every image token,
        where the contrastive embedding is one pooled vector; it costs a text pass per image and prompt.
        `max_pairs` image-prompt pairs go through at once: on two CPU cores 256 ran 10,800 pairs in 14.5 s
        with 180 MB more memory, 2048 in 22.3 s with 1.3 GB more.

        On a CPU that computes bf16 natively the pairs run in bf16, as PLIP trains there: 4.0 s against 8.5 s
        for oral mucosa's 68 dev images (4,080 pairs), the same verdicts, log-odds within 0.01 (a test
        checks them against fp32)."""
        if not class_texts or any(len(texts) == 0 for texts in class_texts):
            raise ValueError("class_texts: every class needs at least one prompt")
        dtype = self.model.vision_proj.weight.dtype
        scores = torch.empty(len(image_tokens), len(class_texts))
        # A model already in a lower precision (loaded in bf16) runs as it is.
        with native_bf16_autocast(self.device) if dtype == torch.float32 else nullcontext():
            for column, texts in enumerate(class_texts):
                scores[:, column] = self._match_column(image_tokens, texts, max_pairs, dtype)
        return scores

    def _match_column(
        self, image_tokens: torch.Tensor, texts: Sequence[str], max_pairs: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """(N,) one class's mean match log-odds over its prompts."""
        column = torch.empty(len(image_tokens))
        tokens = self._tokenize(texts)
        per_batch = max(1, max_pairs // len(texts))
        for start in range(0, len(image_tokens), per_batch):
            images = image_tokens[start : start + per_batch].to(self.device, dtype)
            pairs = images.repeat_interleave(len(texts), dim=0)  # image-major: (B * prompts, 1+P, width)
            logits = self.model.itm_logits(
                pairs,
                tokens["input_ids"].repeat(len(images), 1),
                tokens["attention_mask"].repeat(len(images), 1),
            ).float()
            log_odds = (logits[:, 1] - logits[:, 0]).view(len(images), len(texts))
            column[start : start + len(images)] = log_odds.mean(dim=1).cpu()
        return column

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Normalised text embeddings (N, D); texts are truncated to the model's `max_text_length` tokens."""
        chunks = []
        for start in range(0, len(texts), batch_size):
            tokens = self._tokenize(texts[start : start + batch_size])
            chunks.append(
                self.model.get_text_features(tokens["input_ids"], tokens["attention_mask"]).float().cpu()
            )
        if not chunks:
            return torch.empty(0, self.model.config.embed_dim)
        return torch.cat(chunks)

    def class_embeddings(self, class_texts: Sequence[Sequence[str]]) -> torch.Tensor:
        """(C, D): per class, the re-normalised mean of its prompts' normalised embeddings (prompt
        ensemble); remembered for the same prompts (the model is in eval mode and not trained here)."""
        if not class_texts or any(len(texts) == 0 for texts in class_texts):
            raise ValueError("class_texts: every class needs at least one prompt")
        key = tuple(tuple(texts) for texts in class_texts)
        if key not in self._class_embeddings:
            self._class_embeddings[key] = torch.stack(
                [F.normalize(self.encode_texts(list(texts)).mean(0), dim=0) for texts in class_texts]
            )
        return self._class_embeddings[key].clone()

    def proba_from_embeddings(self, image_embeds: torch.Tensor, class_embeds: torch.Tensor) -> np.ndarray:
        """(N, C) class probabilities: softmax of cosine similarities over the model's temperature."""
        logits = image_embeds @ class_embeds.t() / self.model.temperature().item()
        return F.softmax(logits, dim=1).numpy()

    def predict_proba(
        self, images: Sequence[ImageSource], class_texts: Sequence[Sequence[str]], batch_size: int = 64
    ) -> np.ndarray:
        """(N, C) zero-shot class probabilities for images, one prompt list per class."""
        return self.proba_from_embeddings(
            self.encode_images(images, batch_size), self.class_embeddings(class_texts)
        )


def recall_at_k(
    similarity: np.ndarray, positives: np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Share of queries (rows) with a positive among their top-k columns, for each k."""
    if similarity.shape != positives.shape:
        raise ValueError(f"recall_at_k: similarity {similarity.shape} and positives {positives.shape} differ")
    if not positives.any(axis=1).all():
        raise ValueError("recall_at_k: every query needs at least one positive")
    order = np.argsort(-similarity, axis=1, kind="stable")
    hits = np.take_along_axis(positives, order, axis=1)
    return {f"R@{k}": float(hits[:, :k].any(axis=1).mean()) for k in ks}


def zeroshot_predictions(
    zs: PlipZeroShot,
    image_embeds: torch.Tensor,
    label_map: LabelMap,
    templates: Sequence[str] = ZEROSHOT_TEMPLATES,
) -> tuple[list[str], np.ndarray]:
    """Predicted labels and (N, C) probabilities from precomputed image embeddings (prompt ensemble)."""
    proba = zs.proba_from_embeddings(
        image_embeds, zs.class_embeddings(class_prompts(label_map, tuple(templates)))
    )
    labels = label_map.labels()
    return [labels[i] for i in proba.argmax(axis=1)], proba


def classify_images(
    zs: PlipZeroShot,
    images: Sequence[ImageSource],
    label_map: LabelMap,
    templates: Sequence[str] = ZEROSHOT_TEMPLATES,
    head: str = "contrastive",
    batch_size: int = 64,
    progress: bool = False,
) -> tuple[list[str], np.ndarray]:
    """Zero-shot labels and (N, C) class scores of images by one of `ZEROSHOT_HEADS` (prompt ensembles).
    The matching head's scores are a softmax over its mean match log-odds: a ranking, not calibrated."""
    _check_head(head)
    if head == "contrastive":  # one vector per image kept, not its tokens
        embeds = zs.encode_images(images, batch_size, progress=progress)
        return zeroshot_predictions(zs, embeds, label_map, templates)
    tokens = zs.encode_image_tokens(images, batch_size, progress=progress)
    return classify_tokens(zs, tokens, label_map, templates, head)


def classify_tokens(
    zs: PlipZeroShot,
    image_tokens: torch.Tensor,
    label_map: LabelMap,
    templates: Sequence[str] = ZEROSHOT_TEMPLATES,
    head: str = "contrastive",
) -> tuple[list[str], np.ndarray]:
    """`classify_images` from the tower's tokens (`encode_image_tokens`), so that both heads can read one
    pass through the vision tower."""
    _check_head(head)
    if head == "contrastive":
        return zeroshot_predictions(zs, zs.embed_tokens(image_tokens), label_map, templates)
    scores = zs.match_scores(image_tokens, class_prompts(label_map, tuple(templates)))
    proba = F.softmax(scores, dim=1).numpy()
    labels = label_map.labels()
    return [labels[i] for i in proba.argmax(axis=1)], proba


def _check_head(head: str) -> None:
    if head not in ZEROSHOT_HEADS:
        raise ValueError(f"unknown zero-shot head {head!r}; expected one of {', '.join(ZEROSHOT_HEADS)}")
