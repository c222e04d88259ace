"""PLIP pre-training objective: ITC (optionally with momentum encoders, queues and soft targets) + ITM.

`PlipPretrainer` wraps a `PlipModel` with the training-only state (momentum copy, feature queues), so the
saved model directory holds only the encoder while training checkpoints hold everything needed to resume.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pallava.models.plip.losses import (
    clip_loss,
    contrastive_loss,
    gather_no_grad,
    itm_loss,
    positive_targets,
    sample_hard_negatives,
)
from pallava.models.plip.modeling_plip import PlipModel


@dataclass
class PlipPretrainingOutput:
    """Losses of one step; `loss` = loss_itc + itm_weight * loss_itm."""

    loss: torch.Tensor
    loss_itc: torch.Tensor
    loss_itm: torch.Tensor
    itm_accuracy: torch.Tensor


class PlipPretrainer(nn.Module):
    """Computes the PLIP pre-training losses for a batch of image-text pairs."""

    def __init__(self, model: PlipModel):
        super().__init__()
        self.model = model
        config = model.config
        self.use_momentum = config.use_momentum
        if self.use_momentum:
            self.momentum_model = copy.deepcopy(model)
            self.momentum_model.requires_grad_(False)
            dim, size = config.embed_dim, config.queue_size
            self.register_buffer("image_queue", F.normalize(torch.randn(size, dim), dim=1))
            self.register_buffer("text_queue", F.normalize(torch.randn(size, dim), dim=1))
            # Random features fill the queue at first; key -1 never matches a real pair.
            self.register_buffer("key_queue", torch.full((size, 2), -1, dtype=torch.long))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _momentum_update(self) -> None:
        m = self.model.config.momentum
        for param, param_m in zip(self.model.parameters(), self.momentum_model.parameters(), strict=True):
            param_m.mul_(m).add_(param.detach(), alpha=1 - m)

    @torch.no_grad()
    def _enqueue(self, image_feats: torch.Tensor, text_feats: torch.Tensor, keys: torch.Tensor) -> None:
        size, n = self.image_queue.shape[0], image_feats.shape[0]
        index = (int(self.queue_ptr) + torch.arange(n, device=image_feats.device)) % size
        # Under bf16 autocast the momentum features come out in bf16; the queues keep their own (fp32)
        # precision.
        self.image_queue[index] = image_feats.to(self.image_queue.dtype)
        self.text_queue[index] = text_feats.to(self.text_queue.dtype)
        self.key_queue[index] = keys
        self.queue_ptr.fill_((int(self.queue_ptr) + n) % size)

    def _itc(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_feat: torch.Tensor,
        text_feat: torch.Tensor,
        match_keys: torch.Tensor,
        alpha: float,
    ) -> torch.Tensor:
        temp = self.model.temperature()
        if not self.use_momentum:
            return clip_loss(image_feat, text_feat, temp, match_keys)
        all_keys = gather_no_grad(match_keys)
        with torch.no_grad():
            self._momentum_update()
            image_feat_m = self.momentum_model.get_image_features(pixel_values)
            text_feat_m = self.momentum_model.get_text_features(input_ids, attention_mask)
            image_m_all, text_m_all = gather_no_grad(image_feat_m), gather_no_grad(text_feat_m)
            image_keys = torch.cat([image_m_all, self.image_queue.clone()])  # (B_global + Q, D)
            text_keys = torch.cat([text_m_all, self.text_queue.clone()])
            key_keys = torch.cat([all_keys, self.key_queue.clone()])
            targets = positive_targets(match_keys, key_keys)
            # Soft targets: the momentum model's own similarities, distilled into the online model.
            soft_i2t = F.softmax(image_feat_m @ text_keys.t() / temp, dim=1)
            soft_t2i = F.softmax(text_feat_m @ image_keys.t() / temp, dim=1)
            targets_i2t = alpha * soft_i2t + (1 - alpha) * targets
            targets_t2i = alpha * soft_t2i + (1 - alpha) * targets
        loss = contrastive_loss(image_feat, text_feat, image_keys, text_keys, temp, targets_i2t, targets_t2i)
        self._enqueue(image_m_all, text_m_all, all_keys)
        return loss

    def _itm(
        self,
        image_tokens: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_feat: torch.Tensor,
        text_feat: torch.Tensor,
        match_keys: torch.Tensor,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ITM over [positives, (hard-negative image, text), (image, hard-negative text)] within the local
        batch.

        Negatives come from the whole local batch; `itm_max_pairs` caps how many positives are scored.
        """
        limit = self.model.config.itm_max_pairs
        n = min(limit, image_tokens.shape[0]) if limit > 0 else image_tokens.shape[0]  # positives used
        with torch.no_grad():
            sim_i2t = image_feat[:n] @ text_feat.t() / self.model.temperature()  # (n, B)
            sim_t2i = text_feat[:n] @ image_feat.t() / self.model.temperature()  # (n, B)
            neg_text, valid_i = sample_hard_negatives(sim_i2t, match_keys[:n], match_keys, generator)
            neg_image, valid_t = sample_hard_negatives(sim_t2i, match_keys[:n], match_keys, generator)
        tokens = torch.cat([image_tokens[:n], image_tokens[neg_image], image_tokens[:n]])  # (3n, 1+P, Wv)
        ids = torch.cat([input_ids[:n], input_ids[:n], input_ids[neg_text]])  # (3n, T)
        mask = torch.cat([attention_mask[:n], attention_mask[:n], attention_mask[neg_text]])
        logits = self.model.itm_logits(tokens, ids, mask)  # (3n, 2)
        labels = torch.cat([torch.ones(n), torch.zeros(2 * n)]).long().to(logits.device)
        valid = torch.cat([torch.ones(n, dtype=torch.bool, device=logits.device), valid_t, valid_i])
        accuracy = (logits.argmax(dim=1) == labels)[valid].float().mean()
        return itm_loss(logits, labels, valid), accuracy

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        match_keys: torch.Tensor,
        alpha: float | None = None,
        generator: torch.Generator | None = None,
    ) -> PlipPretrainingOutput:
        """Losses for B pairs: pixel_values (B,3,S,S), input_ids/attention_mask (B,T), match_keys (B,2).

        match_keys (image key, text key) must be unique across the corpus (they also tag queued features).
        """
        config = self.model.config
        with torch.no_grad():
            self.model.temp.clamp_(config.temp_min, config.temp_max)
        image_tokens = self.model.image_tokens(pixel_values)
        image_feat = self.model.image_embeds(image_tokens)
        text_feat = self.model.text_embeds(self.model.text_states(input_ids, attention_mask), attention_mask)
        alpha = config.alpha if alpha is None else alpha
        loss_itc = self._itc(
            pixel_values, input_ids, attention_mask, image_feat, text_feat, match_keys, alpha
        )
        if config.itm_weight > 0:
            loss_itm, itm_accuracy = self._itm(
                image_tokens, input_ids, attention_mask, image_feat, text_feat, match_keys, generator
            )
        else:
            loss_itm = itm_accuracy = torch.zeros((), device=pixel_values.device)
        return PlipPretrainingOutput(
            loss_itc + config.itm_weight * loss_itm, loss_itc, loss_itm, itm_accuracy
        )
