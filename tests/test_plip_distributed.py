"""Two gloo processes on halves of a batch match one process on the whole batch: ITC loss and gradients."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pallava.models.plip import build_plip
from pallava.models.plip.pretraining import PlipPretrainer
from pallava.train.launch import free_port

pytestmark = pytest.mark.slow  # end to end: `make test-fast` skips it, `make test` runs it

BATCH = 8
WORLD = 2
MODES = (False, True)  # without / with momentum encoders and queues


def _pretrainer(
    use_momentum: bool,
) -> tuple[PlipPretrainer, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same model and global batch in every process (seeded); ITM off: its negatives are per process."""
    model, tokenizer = build_plip(
        "tiny",
        text_init="scratch",
        text_layers=1,
        seed=0,
        itm_weight=0.0,
        use_momentum=use_momentum,
        queue_size=16,
    )
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(BATCH, 3, 224, 224, generator=gen)
    captions = [f"class {i % 3} tissue sample {i}" for i in range(BATCH)]
    tokens = tokenizer(captions, padding=True, return_tensors="pt")
    keys = torch.stack([torch.arange(BATCH), torch.arange(BATCH) % 3], dim=1)  # class-level text keys
    return PlipPretrainer(model), pixels, tokens["input_ids"], tokens["attention_mask"], keys


def _step(pretrainer, pixels, ids, mask, keys) -> tuple[float, dict[str, torch.Tensor], torch.Tensor | None]:
    output = pretrainer(pixels, ids, mask, keys, alpha=0.4)
    output.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in pretrainer.model.named_parameters() if p.grad is not None}
    queue = pretrainer.image_queue.clone() if pretrainer.use_momentum else None
    return output.loss.item(), grads, queue


def _worker(rank: int, port: int, results: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        outcome = {}
        for use_momentum in MODES:
            pretrainer, pixels, ids, mask, keys = _pretrainer(use_momentum)
            shard = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
            loss, grads, queue = _step(pretrainer, pixels[shard], ids[shard], mask[shard], keys[shard])
            # What data-parallel training does: average the loss for logging and the gradients for the update.
            loss_t = torch.tensor(loss)
            dist.all_reduce(loss_t)
            for grad in grads.values():
                dist.all_reduce(grad)
                grad /= WORLD
            outcome[use_momentum] = {"loss": loss_t.item() / WORLD, "grads": grads, "queue": queue}
        if rank == 0:
            torch.save(outcome, results)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    results = tmp_path_factory.mktemp("gloo") / "rank0.pt"
    mp.spawn(_worker, args=(free_port(), str(results)), nprocs=WORLD, join=True)
    return torch.load(results)


@pytest.mark.parametrize("use_momentum", MODES, ids=["in-batch", "momentum-queue"])
def test_two_processes_match_one_process(use_momentum, two_process_results):
    loss, grads, queue = _step(*_pretrainer(use_momentum))
    distributed = two_process_results[use_momentum]
    assert distributed["loss"] == pytest.approx(loss, rel=1e-5)
    assert distributed["grads"].keys() == grads.keys()
    assert "vision_model.embeddings.patch_embedding.weight" in grads and "temp" in grads
    for name, grad in grads.items():
        torch.testing.assert_close(distributed["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    if use_momentum:  # both processes enqueue the gathered global batch, in order
        torch.testing.assert_close(distributed["queue"], queue)
