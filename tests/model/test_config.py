"""BertConfig: Hugging Face config.json in and out, per-layer sizes, validation."""

import json
import re

import pytest
import transformers

from bertforge.model import BertConfig
from bertforge.train.corpus import minilm_checkpoint


def test_reads_real_config_json():
    config = BertConfig.from_json_file(minilm_checkpoint() / "config.json")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (384, 6, 12)
    assert (config.intermediate_size, config.head_dim, config.vocab_size) == (1536, 32, 30522)


def test_json_round_trip_and_transformers_reads_it(tmp_path):
    config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=100, hidden_act="gelu_new", layer_norm_eps=1e-6, num_labels=5)
    config.to_json_file(tmp_path / "config.json", architectures=["BertForSequenceClassification"])
    assert BertConfig.from_json_file(tmp_path / "config.json") == config
    theirs = transformers.BertConfig.from_json_file(tmp_path / "config.json")
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "hidden_act", "layer_norm_eps", "num_labels"):
        assert getattr(theirs, field) == getattr(config, field), field


def test_reads_transformers_config_with_labels():
    theirs = transformers.BertConfig(vocab_size=500, hidden_size=64, num_attention_heads=2, num_labels=3)
    config = BertConfig.from_dict(json.loads(theirs.to_json_string()))
    assert config.num_labels == 3 and config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    assert (config.vocab_size, config.hidden_size, config.num_attention_heads) == (500, 64, 2)


def test_per_layer_sizes():
    config = BertConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                        heads_per_layer=[4, 1, 2], intermediate_size_per_layer=(10, 20, 30))
    assert [config.layer_heads(i) for i in range(3)] == [4, 1, 2]
    assert [config.layer_intermediate_size(i) for i in range(3)] == [10, 20, 30]
    assert BertConfig.from_dict(config.to_dict()) == config
    assert "heads_per_layer" not in BertConfig().to_dict()  # uniform models write what transformers expects


@pytest.mark.parametrize("fields, message", [
    (dict(hidden_size=100, num_attention_heads=3), "must be a multiple of num_attention_heads"),
    (dict(hidden_size=96, num_attention_heads=4), "head_dim = hidden_size / num_attention_heads = 24"),
    (dict(hidden_size=512, num_attention_heads=2), "head_dim = hidden_size / num_attention_heads = 256"),
    (dict(num_hidden_layers=0), "num_hidden_layers must be a positive int"),
    (dict(vocab_size=10.5), "vocab_size must be a positive int"),
    (dict(hidden_act="relu"), "hidden_act must be one of"),
    (dict(position_embedding_type="relative_key"), "only absolute position embeddings"),
    (dict(hidden_dropout_prob=1.0), "hidden_dropout_prob must be in"),
    (dict(layer_norm_eps=0.0), "layer_norm_eps must be a positive number, got 0.0"),
    (dict(pad_token_id=30522), r"pad_token_id must be an int in \[0, vocab_size=30522\), got 30522"),
    (dict(num_hidden_layers=2, heads_per_layer=[12]), "heads_per_layer must list one size per layer"),
    (dict(num_hidden_layers=2, intermediate_size_per_layer=[5, 0]), "must hold positive ints"),
    (dict(num_labels=2, id2label={0: "a"}), "id2label has 1 entries but num_labels is 2"),
])
def test_invalid_config_raises(fields, message):
    with pytest.raises(ValueError, match=message):
        BertConfig(**fields)


@pytest.mark.parametrize("fields, message", [
    (dict(model_type="roberta"), "not a BERT config"),
    (dict(architectures=["RobertaForMaskedLM"]), "not a BERT config"),
    (dict(is_decoder=True), "decoder BERT configs"),
    (dict(tie_word_embeddings=False), "tie_word_embeddings=false"),
    (dict(pruned_heads={"0": [1]}), "pruned_heads"),
])
def test_foreign_config_json_raises(fields, message):
    with pytest.raises(ValueError, match=message):
        BertConfig.from_dict({"model_type": "bert", **fields})


def _write_config(folder, text):
    path = folder / "config.json"
    path.write_text(text)
    return path


@pytest.mark.parametrize("fields, message", [
    ({"hidden_size": "768"}, "hidden_size must be a positive int, got '768'"),
    ({"num_attention_heads": True}, "num_attention_heads must be a positive int, got True"),
    ({"hidden_dropout_prob": "0.1"}, r"hidden_dropout_prob must be in \[0, 1\), got '0.1'"),
    ({"layer_norm_eps": None}, "layer_norm_eps must be a positive number, got None"),
    ({"hidden_act": ["gelu"]}, "hidden_act must be one of"),
    ({"pad_token_id": "0"}, "pad_token_id must be an int"),
    ({"problem_type": ["regression"]}, "unknown problem_type"),
    ({"id2label": ["neg", "pos"]}, "id2label must map class indices to names"),
    ({"architectures": "BertModel"}, "architectures must be a list of class names"),
])
def test_config_json_of_wrong_field_types_names_file_and_field(tmp_path, fields, message):
    path = _write_config(tmp_path, json.dumps({**BertConfig().to_dict(), **fields}))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": .*" + message):
        BertConfig.from_json_file(path)


@pytest.mark.parametrize("content, message", [
    (b'{"model_type": "bert", "hidden_size": 768,', "is not valid JSON"),
    (b"[1, 2]", "must hold a JSON object of config fields, got a list"),
    (b"\xff\xfe{}", "is not valid JSON"),  # not UTF-8
])
def test_unreadable_config_json_names_the_file(tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(path)) + " " + message):
        BertConfig.from_json_file(path)


def test_config_json_without_model_type_is_not_a_bert_config(tmp_path):
    fields = BertConfig().to_dict()
    del fields["model_type"]
    path = _write_config(tmp_path, json.dumps(fields))
    with pytest.raises(ValueError, match=re.escape(str(path)) + r': not a BERT config: no "model_type" field'):
        BertConfig.from_json_file(path)
