"""Recipes: shared sections + per-stage sections + overrides, strict keys and types."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pallava.train.config import load_recipe, parse_overrides, recipe_differences, with_defaults
from pallava.train.plip_config import PlipTrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_stage_sections_and_overrides_merge_in_order(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "optim: {lr: 1.0e-4}\ntrain: {epochs: 2, batch_size: 4}\n"
        "stages:\n  instruct:\n    optim: {lr_lora: 2.0e-4}\n    train: {epochs: 5}\n"
    )
    align = load_recipe(path, "align", ["data.path=x.jsonl"])
    assert (align.optim.lr, align.optim.lr_lora, align.train.epochs) == (1e-4, None, 2)
    instruct = load_recipe(path, "instruct", ["train.epochs=7", "optim.lr=3e-4", "trainable.llm=true"])
    assert instruct.stage == "instruct"
    assert instruct.train.epochs == 7 and instruct.train.batch_size == 4
    assert instruct.optim.lr == pytest.approx(
        3e-4
    )  # YAML reads 3e-4 as text; the field type makes it a float
    assert instruct.optim.lr_lora == pytest.approx(2e-4)
    assert instruct.trainable.llm is True
    assert set(recipe_differences(align.to_dict(), instruct.to_dict())) == {
        "stage",
        "data.path",
        "optim.lr",
        "optim.lr_lora",
        "trainable.llm",
        "train.epochs",
    }


def test_unknown_keys_and_bad_values_name_the_file_and_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("optim: {learning_rate: 1}\n")
    with pytest.raises(ValueError, match=r"r\.yaml: optim: unknown key\(s\) \['learning_rate'\]"):
        load_recipe(path, "align")
    with pytest.raises(ValueError, match=r"train\.batch_size: expected int"):
        load_recipe(None, "align", ["train.batch_size=many"])
    with pytest.raises(ValueError, match="section.key=value"):
        parse_overrides(["optim.lr"])
    with pytest.raises(ValueError, match="stage must be one of"):
        load_recipe(None, "pretrain")
    with pytest.raises(ValueError, match="no training data"):
        load_recipe(None, "align").validate()
    with pytest.raises(ValueError, match="stage instruct starts from a trained model"):
        load_recipe(None, "instruct", ["data.path=x"]).validate()
    bad = load_recipe(None, "align", ["data.path=x", "feature_cache.enabled=true", "trainable.vision=true"])
    with pytest.raises(ValueError, match="frozen vision tower"):
        bad.validate()
    with pytest.raises(ValueError, match="train.loss_average must be token or sample, got 'word'"):
        load_recipe(None, "align", ["data.path=x", "train.loss_average=word"]).validate()


def test_shipped_recipes_load_for_both_stages():
    for name in ("assistant-tiny.yaml", "assistant-paper.yaml"):
        for stage in ("align", "instruct"):
            recipe = load_recipe(CONFIGS / name, stage, ["data.path=x.jsonl", "model.init=runs/align"])
            recipe.validate()
    tiny = {stage: load_recipe(CONFIGS / "assistant-tiny.yaml", stage) for stage in ("align", "instruct")}
    # The tiny stage 2 learns at a quarter of stage 1's rate (docs/training.md, "Stage 2's learning rate").
    assert tiny["instruct"].optim.lr == pytest.approx(tiny["align"].optim.lr / 4)
    paper = {stage: load_recipe(CONFIGS / "assistant-paper.yaml", stage) for stage in ("align", "instruct")}
    # The paper's hyper-parameters (PA-LLAVA.md, Training).
    assert (
        paper["align"].train.batch_size,
        paper["align"].train.grad_accum,
        paper["align"].train.epochs,
    ) == (6, 6, 9)
    assert paper["align"].optim.lr == pytest.approx(1e-4)
    assert (
        paper["instruct"].train.batch_size,
        paper["instruct"].train.grad_accum,
        paper["instruct"].train.epochs,
    ) == (6, 4, 12)
    assert paper["instruct"].optim.lr_lora == pytest.approx(2e-4)
    assert paper["instruct"].optim.lr_connector == pytest.approx(1e-4)
    for recipe in paper.values():
        assert recipe.optim.warmup_ratio == pytest.approx(0.03) and recipe.optim.max_grad_norm == 1.0
        assert recipe.optim.weight_decay == 0.0 and recipe.optim.betas == [0.9, 0.999]
        assert not recipe.trainable.vision and not recipe.trainable.llm
        assert recipe.trainable.connector and recipe.trainable.lora
        assert recipe.train.mixed_precision == "bf16"


def test_shipped_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    cpu = load_config_from_file(str(CONFIGS / "accelerate" / "cpu-2proc.yaml"))
    assert cpu.num_processes == 2
    zero2 = load_config_from_file(str(CONFIGS / "accelerate" / "deepspeed-zero2.yaml"))
    assert zero2.distributed_type == "DEEPSPEED" and zero2.num_processes == 16
    ds = json.loads((CONFIGS / "accelerate" / "deepspeed-zero2.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] == "auto"


def test_a_recipe_saved_before_a_setting_existed_still_resumes():
    current = load_recipe(None, "align", ["data.path=x.jsonl"]).to_dict()
    saved = json.loads(json.dumps(current))
    del saved["data"]["overlong"]  # written by an older version
    assert recipe_differences(with_defaults(saved), current) == []
    dropping = load_recipe(None, "align", ["data.path=x.jsonl", "data.overlong=drop"]).to_dict()
    assert recipe_differences(with_defaults(saved), dropping) == ["data.overlong"]


def test_plip_recipes_read_over_their_preset_with_the_same_loader(tmp_path):
    """A PLIP recipe sets what differs from configs/plip-<preset>.yaml; errors read like the assistant's."""
    partial = tmp_path / "plip.yaml"
    partial.write_text("preset: tiny\nlr: 2.0e-3\nsave_every: 4\n")
    recipe = PlipTrainConfig.from_yaml(partial, batch_size=8)
    shipped = PlipTrainConfig.for_preset("tiny")
    assert (recipe.lr, recipe.save_every, recipe.batch_size) == (2e-3, 4, 8)
    assert recipe.epochs == shipped.epochs and recipe.text_lr == shipped.text_lr
    partial.write_text("preset: tiny\nlearning_rate: 1\n")
    with pytest.raises(ValueError, match=r"plip\.yaml: unknown key\(s\) \['learning_rate'\]"):
        PlipTrainConfig.from_yaml(partial)
    partial.write_text("preset: tiny\nbatch_size: many\n")
    with pytest.raises(ValueError, match=r"plip\.yaml: batch_size: expected int, got 'many'"):
        PlipTrainConfig.from_yaml(partial)
    partial.write_text("preset: tiny\naugment:\n  graysale: 0.2\n")  # checked on reading, not in training
    with pytest.raises(ValueError, match=r"plip\.yaml 'augment': unknown key\(s\) \['graysale'\]"):
        PlipTrainConfig.from_yaml(partial)
    with pytest.raises(ValueError, match=r"no shipped recipe 'plip-huge'"):
        PlipTrainConfig.for_preset("huge")


def test_a_plip_recipes_vision_fields_merge_over_the_shipped_ones(tmp_path):
    """`vision.patch_size=16` (a file or a flag) changes that field and keeps the shipped stem."""
    shipped = {
        "conv_stem": False,
        "pretrained_stem": "efficientnet-lite0",
        "num_hidden_layers": 6,
        "pretrained_stem_trainable": 2,
    }
    assert PlipTrainConfig.for_preset("tiny").vision == shipped
    partial = tmp_path / "plip.yaml"
    partial.write_text("preset: tiny\nvision:\n  patch_size: 16\n")
    assert PlipTrainConfig.from_yaml(partial).vision == {**shipped, "patch_size": 16}
    flags = PlipTrainConfig.for_preset("tiny", vision={"pretrained_stem": None, "conv_stem": True})
    assert flags.vision == {**shipped, "pretrained_stem": None, "conv_stem": True}


SHARED_RUN_FLAGS = ("--config", "--data", "--out", "--resume", "--seed", "--max-steps", "--no-progress")


def _captured_recipe(monkeypatch, target: str, argv: list[str]):
    """Run a training command with its training function replaced; returns the recipe it was given."""
    from pallava.cli import main

    seen = {}

    def fake(*args, **kwargs):
        seen["recipe"] = next(a for a in args if hasattr(a, "max_steps") or hasattr(a, "train"))
        return {} if "plip" in target else Path(kwargs.get("out_dir", "out"))

    monkeypatch.setattr(target, fake)
    assert main(argv) == 0
    return seen["recipe"]


def test_both_training_commands_share_run_flags_and_key_value_overrides(monkeypatch, tmp_path):
    from pallava.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    plip_train = commands["plip"]._subparsers._group_actions[0].choices["train"]
    for parser in (commands["train"], plip_train):
        flags = {flag for action in parser._actions for flag in action.option_strings}
        assert set(SHARED_RUN_FLAGS) <= flags
        assert any(action.dest == "overrides" for action in parser._actions)

    common = ["--data", "x.csv", "--out", str(tmp_path / "o"), "--seed", "3", "--max-steps", "2"]
    assistant = _captured_recipe(
        monkeypatch,
        "pallava.train.trainer.train",
        [
            "train",
            "--stage",
            "align",
            "--config",
            str(CONFIGS / "assistant-tiny.yaml"),
            *common,
            "optim.lr=2e-4",
        ],
    )
    assert (assistant.model.seed, assistant.data.seed, assistant.train.seed) == (3, 3, 3)
    assert assistant.train.max_steps == 2 and assistant.optim.lr == pytest.approx(2e-4)
    plip = _captured_recipe(
        monkeypatch,
        "pallava.train.plip.train_plip",
        ["plip", "train", "--config", str(CONFIGS / "plip-tiny.yaml"), *common, "lr=2e-4", "text_layers=1"],
    )
    assert (plip.seed, plip.max_steps, plip.text_layers) == (3, 2, 1)
    assert plip.lr == pytest.approx(2e-4)


def test_yes_no_on_off_overrides_stay_words_and_booleans_take_them(tmp_path):
    # YAML 1.1 reads `no` as false: `train.mixed_precision=no` must still mean the text "no".
    recipe = load_recipe(
        None, "align", ["train.mixed_precision=no", "trainable.llm=yes", "trainable.lora=off"]
    )
    assert recipe.train.mixed_precision == "no"
    assert recipe.trainable.llm is True and recipe.trainable.lora is False
    assert parse_overrides(["a=true", "b=False", "c=no"]) == {"a": True, "b": False, "c": "no"}
    plip = PlipTrainConfig.for_preset("tiny", mixed_precision="no")
    assert plip.mixed_precision == "no"
    # In a recipe file an unquoted `no` is already a boolean: the error says how to write it.
    path = tmp_path / "r.yaml"
    path.write_text("train: {mixed_precision: no}\n")
    with pytest.raises(ValueError, match=r"train\.mixed_precision: expected text, got False .*quotes"):
        load_recipe(path, "align")


def test_bf16_if_native_follows_the_cpu_flags(monkeypatch, tmp_path):
    from pallava.train import loop

    with_bf16, without = tmp_path / "bf16", tmp_path / "avx2"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    assert loop.cpu_computes_bf16(with_bf16) and not loop.cpu_computes_bf16(without)
    assert not loop.cpu_computes_bf16(tmp_path / "missing")  # not Linux: assume no
    monkeypatch.setattr(loop.torch.cuda, "is_available", lambda: False)
    for native, expected in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(loop, "cpu_computes_bf16", lambda native=native: native)
        assert loop.resolve_mixed_precision("bf16-if-native") == expected
        assert loop.resolve_mixed_precision("auto") == "no"  # the assistant's CPU default stays fp32
    assert loop.resolve_mixed_precision("bf16") == "bf16"
    assert (
        load_recipe(None, "align", ["train.mixed_precision=bf16-if-native"]).train.mixed_precision
        == "bf16-if-native"
    )
    with pytest.raises(ValueError, match="mixed_precision must be 'no', 'bf16' or 'bf16-if-native'"):
        PlipTrainConfig.for_preset("tiny", mixed_precision="fp8")
