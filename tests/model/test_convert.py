"""Hugging Face checkpoints in and out: round trips through transformers, and every way a checkpoint can be wrong."""

import copy
import json
import re

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from bert_inputs import mlm_labels, ragged_batch, random_lengths, tiny_config
from bertforge.model import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel
from bertforge.model.convert import load_hf_state_dict, read_checkpoint, to_hf
from bertforge.train.corpus import minilm_checkpoint


def randomised(model):
    """Every tensor random (biases and LayerNorms included), so a round trip that drops or swaps one shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def assert_same_tensors(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


ROUND_TRIPS = [
    (BertForMaskedLM, transformers.BertForMaskedLM, {}),
    (BertModel, transformers.BertModel, {}),
    (BertForSequenceClassification, transformers.BertForSequenceClassification, {"num_labels": 3}),
]


@pytest.mark.parametrize("ours_cls, theirs_cls, extra", ROUND_TRIPS, ids=lambda x: getattr(x, "__name__", ""))
def test_round_trip_bertforge_transformers_bertforge(ours_cls, theirs_cls, extra, tmp_path):
    ours = randomised(ours_cls(tiny_config(**extra)))
    ours.save_pretrained(tmp_path / "bertforge")
    theirs = theirs_cls.from_pretrained(tmp_path / "bertforge", attn_implementation="sdpa").eval()

    ids, mask, types = ragged_batch(ours.config.vocab_size, random_lengths(3, 14))
    with torch.no_grad():
        a, b = ours(ids, mask, types), theirs(input_ids=ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    if ours_cls is BertModel:
        assert (a.last_hidden_state - b.last_hidden_state)[real].abs().max() <= 1e-5
        assert (a.pooler_output - b.pooler_output).abs().max() <= 1e-5
    elif ours_cls is BertForMaskedLM:
        assert (a.logits - b.logits)[real].abs().max() <= 1e-5
        labels = mlm_labels(ids, mask, ours.config.vocab_size)
        with torch.no_grad():
            sparse = ours(ids, mask, types, labels=labels).loss
            dense = theirs(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels).loss
        assert abs(sparse.item() - dense.item()) <= 1e-5
    else:
        assert (a.logits - b.logits).abs().max() <= 1e-5

    theirs.save_pretrained(tmp_path / "transformers")
    back = ours_cls.from_pretrained(tmp_path / "transformers")
    assert_same_tensors(back, ours)
    assert back.config.num_labels == ours.config.num_labels


def test_bare_model_checkpoint_has_no_prefix_and_mlm_has_no_decoder_copy(tmp_path):
    BertModel(tiny_config()).save_pretrained(tmp_path / "bare")
    BertForMaskedLM(tiny_config()).save_pretrained(tmp_path / "mlm")
    bare, mlm = load_file(tmp_path / "bare" / "model.safetensors"), load_file(tmp_path / "mlm" / "model.safetensors")
    assert "encoder.layer.0.attention.self.query.weight" in bare and not any(k.startswith("bert.") for k in bare)
    assert "bert.encoder.layer.1.output.LayerNorm.bias" in mlm and "cls.predictions.bias" in mlm
    assert "cls.predictions.decoder.weight" not in mlm  # tied to the word embeddings, as transformers writes it
    config = json.loads((tmp_path / "mlm" / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"] and config["model_type"] == "bert"


def test_real_encoder_checkpoint_into_heads_warns_and_keeps_encoder():
    path = minilm_checkpoint()
    encoder = BertModel.from_pretrained(path)
    with pytest.warns(UserWarning, match=r"INITIALISED AT RANDOM.*cls\.predictions\.transform\.dense\.weight"), \
            pytest.warns(UserWarning, match=r"not used by BertForMaskedLM.*bert\.pooler\.dense\.bias"):
        mlm = BertForMaskedLM.from_pretrained(path)  # transformers' BertForMaskedLM has no pooler either
    with pytest.warns(UserWarning, match=r"INITIALISED AT RANDOM: \['classifier\.bias', 'classifier\.weight'\]"):
        classifier = BertForSequenceClassification.from_pretrained(path, num_labels=4)
    assert classifier.classifier.out_features == 4
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(classifier.bert.state_dict()[name], tensor), name
        if not name.startswith("pooler."):
            assert torch.equal(mlm.bert.state_dict()[name], tensor), name
    assert torch.all(mlm.head.bias == 0)  # fresh head: initialised like transformers does


def _minilm_state():
    return read_checkpoint(minilm_checkpoint())


def _minilm_model():
    return BertModel(BertConfig.from_json_file(minilm_checkpoint() / "config.json"))


def test_missing_keys_error_lists_them():
    state = _minilm_state()
    del state["encoder.layer.3.attention.self.key.weight"], state["embeddings.LayerNorm.bias"]
    with pytest.raises(ValueError, match="missing keys") as error:
        load_hf_state_dict(_minilm_model(), state)
    assert "bert.encoder.layer.3.attention.self.key.weight" in str(error.value)
    assert "bert.embeddings.LayerNorm.bias" in str(error.value)


def test_unexpected_keys_error_lists_them():
    state = _minilm_state()
    state["encoder.layer.6.output.dense.weight"] = torch.zeros(384, 1536)  # a 7th layer the config lacks
    with pytest.raises(ValueError, match=r"unexpected keys \['bert\.encoder\.layer\.6\.output\.dense\.weight'\]"):
        load_hf_state_dict(_minilm_model(), state)


def test_shape_mismatch_error_names_tensor_and_shapes():
    message = r"intermediate\.dense\.weight: checkpoint \(1536, 384\) vs model \(1024, 384\)"
    with pytest.raises(ValueError, match=message):
        BertModel.from_pretrained(minilm_checkpoint(), intermediate_size=1024)


def test_non_bert_checkpoint_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta", "architectures": ["RobertaModel"]}))
    with pytest.raises(ValueError, match="not a BERT config"):
        BertModel.from_pretrained(tmp_path)
    roberta_style = {f"roberta.{k}": v for k, v in _minilm_state().items()}
    with pytest.raises(ValueError, match=r"missing keys \['bert\.embeddings\.LayerNorm\.bias'.*unexpected keys "
                                         r"\['roberta\.embeddings"):
        load_hf_state_dict(_minilm_model(), roberta_style)


def test_missing_folder_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        BertModel.from_pretrained(tmp_path)
    BertConfig().to_json_file(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin"):
        BertModel.from_pretrained(tmp_path)


def test_pretraining_checkpoint_loads_with_nsp_head_dropped(tmp_path):
    """An original-BERT-style file: BertForPreTraining keys, LayerNorm gamma/beta, the tied decoder stored."""
    ours = randomised(BertForMaskedLM(tiny_config()))
    state = to_hf(ours.state_dict())
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v.clone()
             for k, v in state.items()}
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"].clone()
    state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"].clone()
    state["cls.seq_relationship.weight"] = torch.zeros(2, 32)
    state["cls.seq_relationship.bias"] = torch.zeros(2)
    torch.save(state, tmp_path / "pytorch_model.bin")
    ours.config.to_json_file(tmp_path / "config.json", architectures=["BertForPreTraining"])
    with pytest.warns(UserWarning, match=r"not used by BertForMaskedLM.*cls\.seq_relationship\.bias"):
        back = BertForMaskedLM.from_pretrained(tmp_path)
    assert_same_tensors(back, ours)


def test_untied_decoder_is_rejected():
    model = BertForMaskedLM(tiny_config())
    state = to_hf(model.state_dict())
    state["cls.predictions.decoder.weight"] = torch.randn_like(state["bert.embeddings.word_embeddings.weight"])
    with pytest.raises(ValueError, match="untied decoder"):
        load_hf_state_dict(BertForMaskedLM(tiny_config()), state)


def test_sharded_safetensors_checkpoint_loads(tmp_path):
    ours = randomised(BertModel(tiny_config()))
    ours.save_pretrained(tmp_path / "whole")
    state = load_file(tmp_path / "whole" / "model.safetensors")
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, shard_keys in shards.items():
        save_file({k: state[k] for k in shard_keys}, tmp_path / name)
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text((tmp_path / "whole" / "config.json").read_text())
    assert_same_tensors(BertModel.from_pretrained(tmp_path), ours)


def test_grown_and_pruned_model_saves_its_live_shape(tmp_path):
    config = tiny_config(num_hidden_layers=2, heads_per_layer=[1, 2], intermediate_size_per_layer=[8, 48])
    ours = randomised(BertForSequenceClassification(config))
    ours.bert.encoder.layers.append(copy.deepcopy(ours.bert.encoder.layers[0]))  # as progressive stacking does
    ours.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["num_hidden_layers"] == 3
    assert written["heads_per_layer"] == [1, 2, 1] and written["intermediate_size_per_layer"] == [8, 48, 8]
    assert_same_tensors(BertForSequenceClassification.from_pretrained(tmp_path), ours)


def _saved_tiny_model(folder):
    BertModel(tiny_config()).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors_error_names_the_file(tmp_path, damage):
    path = _saved_tiny_model(tmp_path) / "model.safetensors"
    content = path.read_bytes()
    path.write_bytes({"truncated": content[: len(content) // 2], "garbage": b"not a checkpoint" * 8,
                      "empty": b""}[damage])
    with pytest.raises(ValueError, match=re.escape(str(path)) + " is not a readable safetensors file"):
        BertModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("content", [b"not a zip or a pickle", "a tensor, not a dict"], ids=["garbage", "tensor"])
def test_unreadable_pytorch_bin_error_names_the_file(tmp_path, content):
    BertConfig().to_json_file(tmp_path / "config.json")
    path = tmp_path / "pytorch_model.bin"
    if isinstance(content, bytes):
        path.write_bytes(content)
        message = " is not a readable PyTorch checkpoint"
    else:
        torch.save(torch.zeros(3), path)
        message = " holds a Tensor, not a state dict of tensors"
    with pytest.raises(ValueError, match=re.escape(str(path)) + message):
        BertModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("index", ['{"weight_map": ', '{"metadata": {}}', '{"weight_map": ["a.safetensors"]}'])
def test_broken_shard_index_error_names_the_file(tmp_path, index):
    BertConfig().to_json_file(tmp_path / "config.json")
    path = tmp_path / "model.safetensors.index.json"
    path.write_text(index)
    with pytest.raises(ValueError, match=re.escape(str(path)) + " is not a sharded-checkpoint index"):
        BertModel.from_pretrained(tmp_path)


def test_checkpoint_that_does_not_fit_names_the_file(tmp_path):
    BertModel(tiny_config(intermediate_size=64)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    message = re.escape(str(tmp_path / "model.safetensors")) + ": checkpoint shapes do not fit BertModel"
    with pytest.raises(ValueError, match=message):
        BertModel.from_pretrained(tmp_path)


def test_folder_with_bad_config_names_config_json(tmp_path):
    _saved_tiny_model(tmp_path)
    config_path = tmp_path / "config.json"
    with pytest.raises(ValueError, match=re.escape(f"{config_path} with overrides {{'num_labels': 0}}: ")
                       + "BertConfig.num_labels must be a positive int"):
        BertForSequenceClassification.from_pretrained(tmp_path, num_labels=0)
    config = json.loads(config_path.read_text())
    del config["model_type"]  # e.g. another library's config.json next to BERT-shaped weights
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(str(config_path)) + r': not a BERT config: no "model_type"'):
        BertModel.from_pretrained(tmp_path)
