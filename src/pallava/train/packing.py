"""Questions about one image in one sequence: the image is read once, each answer sees only its question.

Stage 2 asks about ten questions of every image. As separate samples each question repeats the image's
tokens and the prompt before them, and the connector reads the image once per question. A *pack* puts up
to `data.pack_questions` questions about one image (one view of it) in one row: the shared prefix (every
token up to the image's last, identical in each question's own encoding) once, then one segment per
question and answer. A segment's tokens attend to the prefix and to their own segment only, and keep the
positions they have alone, so each answer's loss and gradient are those of its separate sample (a test
checks, to float rounding); what changes is which questions share an optimizer step (fewer images a step).

A sample whose conversation does not start with its image, or that would push a pack over the processor's
`max_length`, stays a row of its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pallava.processing.processor import IGNORE_INDEX, PaLlavaProcessor

# The samples here are `train.data.Sample`s (which hold a `Pack`): typed loosely so that the data module can
# import this one without a cycle.
Sample = Any

PAD_SEGMENT = -1  # padding: attends to itself only
PREFIX_SEGMENT = 0  # the shared prefix, and the whole of an unpacked row


@dataclass(frozen=True)
class Pack:
    """Samples about the same image and view, encoded once: `prefix_ids`, then each member's segment."""

    members: list[Sample]
    prefix_ids: list[int]
    segments: list[tuple[list[int], list[int]]]  # (ids, labels) of each member after the prefix


def _image_identity(sample: Sample) -> tuple[str, int]:
    if sample.image_bytes is not None:
        return hashlib.blake2b(sample.image_bytes, digest_size=16).hexdigest(), sample.view
    return f"path:{sample.image}", sample.view


def _split_at_image(ids: list[int], labels: list[int], image_token_id: int):
    """(prefix, segment ids, segment labels): the prefix ends on the last image token and holds no label;
    None where the conversation does not start with its image that way."""
    positions = [i for i, token in enumerate(ids) if token == image_token_id]
    if not positions:
        return None
    cut = positions[-1] + 1
    if any(label != IGNORE_INDEX for label in labels[:cut]) or cut >= len(ids):
        return None
    return ids[:cut], ids[cut:], labels[cut:]


def pack_questions(
    samples: Sequence[Sample], per_pack: int, processor: PaLlavaProcessor, seed: int
) -> list[Sample]:
    """The samples regrouped: questions about the same image and view in packs of at most `per_pack`
    (as even as the count allows: 5 questions in packs of 4 make 3 + 2), the others as they were.

    Seeded: which questions share a pack is a function of (samples, per_pack, seed). A pack takes the
    place of its first member in `samples`, so the epoch order stays a permutation of the same units.
    """
    if per_pack < 1:
        raise ValueError(f"data.pack_questions must be at least 1, got {per_pack}")
    if per_pack == 1:
        return list(samples)
    groups: dict[tuple[str, int], list[int]] = {}
    for index, sample in enumerate(samples):
        if sample.image_source is not None:
            groups.setdefault(_image_identity(sample), []).append(index)
    rng = random.Random(seed)
    units: dict[int, Sample] = {}  # first member's index -> the pack (or the sample left alone)
    for indices in groups.values():
        rng.shuffle(indices)
        count = -(-len(indices) // per_pack)
        sizes = [len(indices) // count + (i < len(indices) % count) for i in range(count)]
        start = 0
        for size in sizes:
            for unit, members in _packs(samples, indices[start : start + size], processor):
                units[min(members)] = unit
            start += size
    packed = {i for indices in groups.values() for i in indices}
    return [
        units[i] if i in packed else sample
        for i, sample in enumerate(samples)
        if i in units or i not in packed
    ]


def _packs(
    samples: Sequence[Sample], indices: Sequence[int], processor: PaLlavaProcessor
) -> list[tuple[Sample, list[int]]]:
    """(unit, member indices) for samples of one image: packs within `max_length`; a sample that cannot
    share its prefix stays alone."""
    out: list[tuple[Sample, list[int]]] = []
    open_packs: dict[tuple[int, ...], tuple[list[int], list[tuple[list[int], list[int]]], int]] = {}
    for index in indices:
        ids, labels = processor.encode_conversation(samples[index].conversation)
        split = _split_at_image(ids, labels, processor.image_token_id)
        if split is None or len(ids) > processor.max_length:
            out.append((samples[index], [index]))
            continue
        prefix, segment_ids, segment_labels = split
        key = tuple(prefix)
        members, segments, length = open_packs.get(key, ([], [], len(prefix)))
        if members and length + len(segment_ids) > processor.max_length:
            out.append(_unit(samples, members, prefix, segments))
            members, segments, length = [], [], len(prefix)
        open_packs[key] = (
            members + [index],
            segments + [(segment_ids, segment_labels)],
            length + len(segment_ids),
        )
    for key, (members, segments, _) in open_packs.items():
        out.append(_unit(samples, members, list(key), segments))
    return out


def _unit(samples, members: list[int], prefix: list[int], segments) -> tuple[Sample, list[int]]:
    """A sample standing for `members` (their first one's image, view and provenance), or the one alone."""
    first = samples[members[0]]
    if len(members) == 1:
        return first, members
    pack = Pack([samples[i] for i in members], prefix, segments)
    return dataclasses.replace(first, id="+".join(samples[i].id for i in members), pack=pack), members


def encode_rows(
    rows: Sequence[tuple[list[int], list[int], list[int], list[int]]], pad_id: int
) -> dict[str, Any]:
    """Model inputs of rows (ids, labels, positions, segments), right-padded: input_ids, labels,
    position_ids, segment_ids and a (B, 1, L, L) boolean attention mask. A token sees the earlier tokens of
    its own segment and of the prefix; padding sees itself only (a row of keys all masked has no softmax)."""
    longest = max(len(ids) for ids, *_ in rows)
    shape = (len(rows), longest)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    segments = torch.full(shape, PAD_SEGMENT, dtype=torch.long)
    for row, (ids, lab, pos, seg) in enumerate(rows):
        span = slice(0, len(ids))
        input_ids[row, span], labels[row, span] = torch.tensor(ids), torch.tensor(lab)
        positions[row, span], segments[row, span] = torch.tensor(pos), torch.tensor(seg)
    query, key = segments[:, :, None], segments[:, None, :]
    earlier = torch.ones(longest, longest, dtype=torch.bool).tril()
    mask = earlier & (key != PAD_SEGMENT) & ((key == PREFIX_SEGMENT) | (key == query))
    mask |= torch.eye(longest, dtype=torch.bool) & (query == PAD_SEGMENT)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": positions,
        "segment_ids": segments,
        "attention_mask": mask[:, None],
    }


def sample_row(
    sample: Sample, ids: list[int], labels: list[int]
) -> tuple[list[int], list[int], list[int], list[int]]:
    """The row of a sample: a pack's prefix and segments, or an unpacked sample as one prefix segment."""
    pack = sample.pack
    if pack is None:
        return ids, labels, list(range(len(ids))), [PREFIX_SEGMENT] * len(ids)
    start = len(pack.prefix_ids)
    row_ids, row_labels = list(pack.prefix_ids), [IGNORE_INDEX] * start
    positions, segments = list(range(start)), [PREFIX_SEGMENT] * start
    for number, (segment_ids, segment_labels) in enumerate(pack.segments, start=1):
        row_ids += segment_ids
        row_labels += segment_labels
        positions += range(start, start + len(segment_ids))
        segments += [number] * len(segment_ids)
    return row_ids, row_labels, positions, segments


def answers_in(labels: torch.Tensor, segment_ids: torch.Tensor | None) -> int:
    """Answers with at least one label token left: (row, segment) pairs, or rows without segments."""
    labelled = labels[:, 1:] != IGNORE_INDEX
    if segment_ids is None:
        return int(labelled.any(dim=1).sum())
    groups = answer_groups(labelled, segment_ids)
    return int(groups.unique().numel())


def answer_groups(labelled: torch.Tensor, segment_ids: torch.Tensor | None) -> torch.Tensor:
    """The answer each label position belongs to (row-major, as `labelled.nonzero()`): its row, or with
    segments its (row, segment) pair as one integer. `labelled` is (B, L-1), label at p + 1."""
    rows = labelled.nonzero()
    if segment_ids is None:
        return rows[:, 0]
    segments = segment_ids[:, 1:][labelled]  # the segment of the label token itself
    return rows[:, 0] * (int(segment_ids.max()) + 1) + segments
