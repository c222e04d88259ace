"""Safe checkpoint reading: plain files, wrappers, DeepSpeed folders, framework objects that must not run."""

from __future__ import annotations

import re

import pytest
import torch

from pallava.convert.checkpoint import OpaqueObject, read_state_dict
from pallava.convert.keys import checkpoint_target, summarize_keys

RAN: list[str] = []


def record_run(message: str) -> str:
    """Called only if a loader executes what a pickle names (it must not)."""
    RAN.append(message)
    return message


class FrameworkState:
    """Like a training framework's logger state: pickled by reference to code in this module."""

    def __reduce__(self):
        return record_run, ("unpickling ran code named by the checkpoint",)


def weights() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "projector.model.norm.weight": torch.randn(8, generator=generator),
        "llm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight": torch.randn(
            2, 8, generator=generator
        ),
    }


def assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value)


@pytest.mark.parametrize("layout", ["bare", "state_dict", "module"])
def test_state_dict_files_bare_or_wrapped(tmp_path, layout):
    expected = weights()
    path = tmp_path / "stage2.pth"
    torch.save(expected if layout == "bare" else {layout: expected, "meta": {"epoch": 12}}, path)
    assert_same(read_state_dict(path), expected)


@pytest.mark.parametrize("layout", ["latest-tag", "xtuner-iter-folder"])
def test_deepspeed_folders_load_without_running_framework_code(tmp_path, layout):
    expected = weights()
    states = {"module": expected, "message_hub": FrameworkState(), "ds_version": "0.14.0", "global_steps": 10}
    if layout == "latest-tag":
        folder = tmp_path / "checkpoints"
        (folder / "global_step10").mkdir(parents=True)
        (folder / "latest").write_text("global_step10\n")
        torch.save(states, folder / "global_step10" / "mp_rank_00_model_states.pt")
    else:
        folder = tmp_path / "iter_2000.pth"
        folder.mkdir()
        torch.save(states, folder / "mp_rank_00_model_states.pt")
    RAN.clear()
    assert_same(read_state_dict(folder), expected)
    assert RAN == []


def test_framework_objects_become_inert_placeholders(tmp_path):
    from pallava.convert.checkpoint import safe_torch_load

    path = tmp_path / "states.pt"
    torch.save({"module": weights(), "hub": FrameworkState()}, path)
    RAN.clear()
    loaded = safe_torch_load(path)
    assert isinstance(loaded["hub"], OpaqueObject) and loaded["hub"].qualified_name.endswith(".record_run")
    assert RAN == []


def test_bad_inputs_name_the_file_and_what_was_expected(tmp_path):
    with pytest.raises(ValueError, match="checkpoint not found"):
        read_state_dict(tmp_path / "missing.pth")
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    with pytest.raises(ValueError, match="not a DeepSpeed checkpoint folder"):
        read_state_dict(empty)
    (empty / "latest").write_text("global_step7")
    with pytest.raises(ValueError, match="names tag 'global_step7'"):
        read_state_dict(empty)
    odd = tmp_path / "odd.pth"
    torch.save({"epoch": 3, "note": "no tensors"}, odd)
    with pytest.raises(ValueError, match=r"odd\.pth: expected a state dict of tensors.*epoch"):
        read_state_dict(odd)


def test_lora_keys_without_adapter_name_get_peft_default():
    with_name = "llm.base_model.model.model.layers.3.mlp.up_proj.lora_B.default.weight"
    without = "llm.base_model.model.model.layers.3.mlp.up_proj.lora_B.weight"
    expected = "language_model.base_model.model.model.layers.3.mlp.up_proj.lora_B.default.weight"
    assert checkpoint_target(with_name) == checkpoint_target(without) == expected
    assert checkpoint_target("projector.model.bert.encoder.layer.2.intermediate.dense.weight") is None
    assert checkpoint_target("llm.base_model.model.model.embed_tokens.weight") is None


def test_key_summaries_fold_layer_indices():
    keys = [f"connector.layers.{i}.output.dense.weight" for i in (0, 1, 5)] + ["connector.norm.bias"]
    assert summarize_keys(keys).split("\n  ")[1:] == [
        "connector.layers.{0,1,5}.output.dense.weight",
        "connector.norm.bias",
    ]


def unreadable_files() -> dict[str, bytes]:
    """Files as a user may get them wrong: empty, cut short, damaged, compressed, or not a checkpoint at
    all."""
    import bz2
    import gzip
    import io
    import lzma
    import tarfile

    from safetensors.torch import save

    saved = io.BytesIO()
    torch.save(weights(), saved)
    pth, safetensors = saved.getvalue(), save(weights())
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as archive:
        info = tarfile.TarInfo("stage2.pth")
        info.size = len(pth)
        archive.addfile(info, io.BytesIO(pth))
    return {
        "empty.pth": b"",
        "empty.safetensors": b"",
        "truncated.pth": pth[: len(pth) // 2],
        "damaged.pth": pth[:100] + b"\0" * (len(pth) - 200) + pth[-100:],
        "text.pth": b"not a checkpoint\n" * 20,
        "truncated.safetensors": safetensors[: len(safetensors) // 2],
        "gzip.pth": gzip.compress(pth),
        "gzip.safetensors": gzip.compress(safetensors),
        "bzip2.pth": bz2.compress(pth),
        "xz.pth": lzma.compress(pth),
        "tar.pth": tar.getvalue(),
        "stage2.tar.gz": gzip.compress(tar.getvalue()),
    }


UNREADABLE = {
    "empty.pth": r"empty file \(0 bytes\)",
    "empty.safetensors": r"empty file \(0 bytes\)",
    "truncated.pth": "not a readable PyTorch checkpoint",
    "damaged.pth": "not a readable PyTorch checkpoint",
    "text.pth": "not a readable PyTorch checkpoint",
    "truncated.safetensors": "not a readable safetensors file",
    "gzip.pth": "gzip-compressed; decompress",
    "gzip.safetensors": "gzip-compressed; decompress",
    "bzip2.pth": "bzip2-compressed; decompress",
    "xz.pth": "xz-compressed; decompress",
    "tar.pth": r"a tar archive; unpack it first \(tar -xf\)",
    "stage2.tar.gz": "gzip-compressed; decompress",
}


@pytest.mark.parametrize("name", sorted(UNREADABLE))
def test_unreadable_files_give_one_line_errors_naming_them(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(unreadable_files()[name])
    with pytest.raises(ValueError) as error:
        read_state_dict(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and re.search(UNREADABLE[name], message), (
        message
    )
