"""Record types and label maps: round trips, field errors, built-in vocabularies."""

import json

import pytest

from pallava.data.labels import ClassInfo, LabelMap
from pallava.data.records import CaptionPair, Conversation, LabelledImage, VQAItem


def test_records_round_trip_through_json():
    records = [
        CaptionPair("a.jpg", "an h&e image", "c1", "quilt", {"k": 1}),
        Conversation(
            "v1", "a.jpg", [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}], {"s": 2}
        ),
        Conversation("v2", None, [{"from": "human", "value": "hi"}]),
        VQAItem("q1", "a.jpg", "Which?", "B", "choice", ["x", "y"], {}),
        LabelledImage("a.jpg", "lung_n", "c-1", "train"),
    ]
    for record in records:
        again = type(record).from_dict(json.loads(json.dumps(record.to_dict())))
        assert again == record


@pytest.mark.parametrize(
    ("cls", "data", "message"),
    [
        (CaptionPair, {"image": "a", "id": "x"}, "caption pair x: missing field 'caption'"),
        (CaptionPair, {"image": 3, "caption": "c", "id": "x"}, "field 'image' must be str"),
        (
            Conversation,
            {"id": "x", "image": "a", "conversations": [{"from": "bot", "value": "v"}]},
            "conversations[0].from",
        ),
        (Conversation, {"id": "x", "image": "a", "conversations": []}, "'conversations' is empty"),
        (
            VQAItem,
            {"id": "x", "image": "a", "question": "q", "answer": "a", "answer_type": "maybe"},
            "answer_type",
        ),
        (
            VQAItem,
            {"id": "x", "image": "a", "question": "q", "answer": "A", "answer_type": "choice"},
            "options",
        ),
        (LabelledImage, {"path": "a"}, "missing field 'label'"),
    ],
)
def test_from_dict_names_the_bad_field(cls, data, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        cls.from_dict(data)


def test_builtin_lc25000_map_names_and_synonyms():
    label_map = LabelMap.builtin("lc25000-lung")
    assert label_map.labels() == ["lung_aca", "lung_n", "lung_scc"]
    assert label_map.names() == ["lung adenocarcinoma", "benign lung tissue", "lung squamous cell carcinoma"]
    assert all(len(info.synonyms) >= 3 for info in label_map.values())
    assert label_map.label_for("Squamous cell carcinoma of the lung.") == "lung_scc"
    assert label_map.label_for("normal lung parenchyma") == "lung_n"
    assert label_map.label_for("a cat") is None


def test_label_map_from_file_yaml_and_json(tmp_path):
    (tmp_path / "m.yaml").write_text("a: {name: alpha, synonyms: [first], organ: skin}\nb: {name: beta}\n")
    label_map = LabelMap.from_file(tmp_path / "m.yaml")
    assert label_map["a"] == ClassInfo("a", "alpha", ("first",), "skin")
    assert label_map.names() == ["alpha", "beta"]
    (tmp_path / "m.json").write_text(json.dumps(label_map.to_dict()))
    assert LabelMap.from_file(tmp_path / "m.json").to_dict() == label_map.to_dict()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: {synonyms: [x]}", "label 'a': field 'name'"),
        ("a: {name: x, synonyms: y}", "label 'a': field 'synonyms'"),
        ("[1, 2]", "non-empty mapping"),
        ("a: [unclosed", "not valid YAML"),
    ],
)
def test_label_map_errors_name_file_label_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        LabelMap.from_file(path)
    assert "bad.yaml" in str(info.value)


def test_unknown_builtin_map_lists_available():
    with pytest.raises(ValueError, match="lc25000-lung"):
        LabelMap.builtin("nope")
