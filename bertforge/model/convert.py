"""Hugging Face BERT checkpoints <-> bertforge models, offline.

Names are compared in Hugging Face's layout with the encoder under "bert." (the canonical form): a bare
BertModel checkpoint gets the prefix added, bertforge's fused QKV is split into query/key/value. Every key the
model needs must be in the checkpoint and every checkpoint key must be used, except task heads (pooler, MLM
head, classifier, NSP head), which may be absent (initialised, with a warning) or surplus (dropped, with a
warning) so that an encoder checkpoint can start any task.
"""

import dataclasses
import json
import pickle
import re
import warnings
from pathlib import Path

import torch

from .config import BertConfig

# Module paths, bertforge -> Hugging Face. Inside a layer (bert.encoder.layers.{i}.<path>):
_LAYER_TO_HF = {
    "attention.proj": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
    "output_norm": "output.LayerNorm",
}
# Outside the layers (bertforge's MLM head is "head", its output bias "head.bias"):
_MODULE_TO_HF = {
    "bert.embeddings.norm": "bert.embeddings.LayerNorm",
    "head.dense": "cls.predictions.transform.dense",
    "head.norm": "cls.predictions.transform.LayerNorm",
    "head": "cls.predictions",
}
_LAYER_FROM_HF = {v: k for k, v in _LAYER_TO_HF.items()}
_MODULE_FROM_HF = {v: k for k, v in _MODULE_TO_HF.items()}
_QKV = ("query", "key", "value")
_HEAD_PREFIXES = ("cls.", "classifier.", "bert.pooler.")  # may be missing or surplus (see module docstring)
_SLIMMING_SCALES = (".head_scale", ".neuron_scale")
_BUFFERS = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")  # non-persistent in transformers


def to_hf(state_dict: dict) -> dict:
    """bertforge state dict (encoder under "bert.") -> Hugging Face names; the fused QKV is split in three."""
    out = {}
    for key, tensor in state_dict.items():
        module, param = key.rsplit(".", 1)
        layer = re.fullmatch(r"bert\.encoder\.layers\.(\d+)\.(.+)", module)
        if layer and layer[2] == "attention.qkv":
            for name, part in zip(_QKV, tensor.chunk(3)):
                out[f"bert.encoder.layer.{layer[1]}.attention.self.{name}.{param}"] = part
        elif layer:
            out[f"bert.encoder.layer.{layer[1]}.{_LAYER_TO_HF.get(layer[2], layer[2])}.{param}"] = tensor
        else:
            out[f"{_MODULE_TO_HF.get(module, module)}.{param}"] = tensor
    return out


def from_hf(state_dict: dict) -> dict:
    """Inverse of `to_hf`: query, key and value of each layer are concatenated into the fused QKV."""
    out, qkv = {}, {}
    for key, tensor in state_dict.items():
        module, param = key.rsplit(".", 1)
        layer = re.fullmatch(r"bert\.encoder\.layer\.(\d+)\.(.+)", module)
        if layer and layer[2] in {f"attention.self.{n}" for n in _QKV}:
            qkv.setdefault((layer[1], param), {})[layer[2].rsplit(".", 1)[1]] = tensor
        elif layer:
            out[f"bert.encoder.layers.{layer[1]}.{_LAYER_FROM_HF.get(layer[2], layer[2])}.{param}"] = tensor
        else:
            out[f"{_MODULE_FROM_HF.get(module, module)}.{param}"] = tensor
    for (i, param), parts in qkv.items():
        out[f"bert.encoder.layers.{i}.attention.qkv.{param}"] = torch.cat([parts[n] for n in _QKV])
    return out


def canonical_hf(state_dict: dict) -> dict:
    """A Hugging Face checkpoint's tensors under canonical names: "bert." prefix, weight/bias not gamma/beta,
    no position-id buffers, no tied decoder copies."""
    out = {}
    bare = not any(k.startswith("bert.") for k in state_dict)
    for key, tensor in state_dict.items():
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))
        if bare and key.split(".", 1)[0] in ("embeddings", "encoder", "pooler"):
            key = "bert." + key
        if key not in _BUFFERS:
            out[key] = tensor
    # Older checkpoints store the tied decoder: its weight is the word embedding, its bias cls.predictions.bias.
    decoder = out.pop("cls.predictions.decoder.weight", None)
    words = out.get("bert.embeddings.word_embeddings.weight")
    if decoder is not None and words is not None and not torch.equal(decoder, words):
        raise ValueError("the checkpoint's MLM decoder (cls.predictions.decoder.weight) differs from the word "
                         "embeddings; bertforge ties them, so an untied decoder cannot be loaded")
    decoder_bias = out.pop("cls.predictions.decoder.bias", None)
    if decoder_bias is not None:
        out.setdefault("cls.predictions.bias", decoder_bias)
    return out


def _canonical_model_state(model) -> dict:
    state = model.state_dict()
    return {f"bert.{k}": v for k, v in state.items()} if model.base_prefix == "" else dict(state)


def load_hf_state_dict(model, state_dict: dict):
    """Load a Hugging Face BERT state dict (with or without "bert.") into `model`; ValueError lists any
    missing or unexpected encoder keys and any shape mismatch. Absent heads keep their fresh init (warned)."""
    ckpt = canonical_hf(state_dict)
    expected = to_hf(_canonical_model_state(model))
    missing = sorted(expected.keys() - ckpt.keys())
    unexpected = sorted(ckpt.keys() - expected.keys())
    # EarlyBERT's slimming scales start at 1 (the identity) when a checkpoint has none.
    missing = [k for k in missing if not k.endswith(_SLIMMING_SCALES)]
    bad_missing = [k for k in missing if not k.startswith(_HEAD_PREFIXES)]
    bad_unexpected = [k for k in unexpected if not k.startswith(_HEAD_PREFIXES)]
    name = type(model).__name__
    if bad_missing or bad_unexpected:
        raise ValueError(f"checkpoint does not fit {name}: missing keys {bad_missing}, unexpected keys "
                         f"{bad_unexpected} (Hugging Face names, encoder under 'bert.')")
    mismatched = [f"{k}: checkpoint {tuple(ckpt[k].shape)} vs model {tuple(t.shape)}"
                  for k, t in expected.items() if k in ckpt and ckpt[k].shape != t.shape]
    if mismatched:
        raise ValueError(f"checkpoint shapes do not fit {name} (check config.json): " + "; ".join(mismatched))
    if missing:
        warnings.warn(f"NOT IN THE CHECKPOINT, INITIALISED AT RANDOM: {missing}. {name} needs these head "
                      "weights; train them before using the head's outputs.", stacklevel=3)
    if unexpected:
        warnings.warn(f"checkpoint weights not used by {name} (a head it does not have): {unexpected}",
                      stacklevel=3)
    weights = from_hf({k: ckpt.get(k, t) for k, t in expected.items()})
    if model.base_prefix == "":
        weights = {k.removeprefix("bert."): v for k, v in weights.items()}
    model.load_state_dict(weights, strict=True)
    return model


def checkpoint_files(path) -> list[Path]:
    """The weight files of a Hugging Face folder: model.safetensors, pytorch_model.bin, or their sharded indexes'
    shards."""
    path = Path(path)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).exists():
            return [path / name]
        index = path / f"{name}.index.json"
        if index.exists():
            try:
                shards = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f'{index} is not a sharded-checkpoint index (a JSON object with a "weight_map" '
                                 f"object): {e!r}") from e
            return [path / shard for shard in sorted(set(shards))]
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin (or sharded index) in {path}")


def read_tensors(file: Path) -> dict:
    """The tensors of one .safetensors or PyTorch .bin file; ValueError naming the file if it cannot be read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if file.suffix == ".safetensors":
        try:
            return load_file(file)
        except SafetensorError as e:
            raise ValueError(f"{file} is not a readable safetensors file: {e}") from e
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"{file} is not a readable PyTorch checkpoint ({type(e).__name__}, see the cause "
                         "above)") from e
    if not isinstance(state, dict) or not all(torch.is_tensor(t) for t in state.values()):
        raise ValueError(f"{file} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def read_checkpoint(path) -> dict:
    """Tensors of a Hugging Face folder: model.safetensors, pytorch_model.bin, or their sharded indexes."""
    state = {}
    for file in checkpoint_files(path):
        state.update(read_tensors(file))
    return state


def load_pretrained(cls, path, **config_overrides):
    """Build `cls` from a Hugging Face BERT folder; config_overrides replace config.json fields (e.g. num_labels).
    Errors name the file they come from."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no config.json in {path}")
    config = BertConfig.from_json_file(path / "config.json", **config_overrides)
    state = read_checkpoint(path)
    try:
        return load_hf_state_dict(cls(config), state)
    except ValueError as e:
        raise ValueError(f"{', '.join(str(f) for f in checkpoint_files(path))}: {e}") from e


def live_config(model) -> BertConfig:
    """The model's config with depth and per-layer sizes read from its modules (after stacking or pruning)."""
    config = model.config
    layers = (model if model.base_prefix == "" else model.bert).encoder.layers
    heads = [layer.attention.heads for layer in layers]
    ffn = [layer.intermediate.out_features for layer in layers]
    return dataclasses.replace(
        config, num_hidden_layers=len(layers),
        heads_per_layer=heads if set(heads) != {config.num_attention_heads} else None,
        intermediate_size_per_layer=ffn if set(ffn) != {config.intermediate_size} else None)


def save_pretrained(model, path):
    """config.json + model.safetensors in Hugging Face's layout. Per-layer sizes of a pruned model are written
    too; transformers cannot load those (it has no per-layer sizes), bertforge can."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    live_config(model).to_json_file(path / "config.json", architectures=[model.hf_architecture])
    tensors = to_hf(_canonical_model_state(model))
    if model.base_prefix == "":
        tensors = {k.removeprefix("bert."): v for k, v in tensors.items()}
    # clone: the query/key/value chunks share the fused tensor's storage, which safetensors refuses.
    save_file({k: v.detach().cpu().clone() for k, v in tensors.items()}, path / "model.safetensors",
              metadata={"format": "pt"})
