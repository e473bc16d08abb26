"""`bertforge convert`: a training checkpoint -> a Hugging Face BERT folder (config.json + model.safetensors, and
the run's tokenizer.json, so `bertforge finetune` and `bertforge earlybird` take the folder as --checkpoint).

The folder loads in transformers (`BertForMaskedLM.from_pretrained`) and in bertforge (`from_pretrained`), at the
depth the run had reached when the checkpoint was written.
"""

import dataclasses
from pathlib import Path

from bertforge.model import BertConfig, BertForMaskedLM

from .checkpoint import load_checkpoint
from .loop import ConfigError
from .pretrain import save_vocabulary


@dataclasses.dataclass
class ConvertConfig:
    """What to convert and where to write it."""

    checkpoint: str | None = None  # a checkpoint.pt written by bertforge pretrain
    out_dir: str | None = None  # the Hugging Face folder to write (must not hold a model already)
    overwrite: bool = False

    def __post_init__(self):
        found = [f"--{name} is required" for name in ("checkpoint", "out_dir") if getattr(self, name) is None]
        if found:
            raise ConfigError("\n".join(found))


def convert(cfg: ConvertConfig) -> dict:
    """Write the checkpoint's model as a Hugging Face folder; returns where and at which step."""
    out = Path(cfg.out_dir)
    if (out / "config.json").exists() and not cfg.overwrite:
        raise FileExistsError(f"{out} already holds a model (config.json); give --overwrite true or another --out_dir")
    checkpoint = load_checkpoint(cfg.checkpoint)
    model = BertForMaskedLM(BertConfig(**checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    model.save_pretrained(out)
    save_vocabulary(checkpoint["run_config"], out)
    return {"out_dir": str(out), "step": checkpoint["step"], "layers": model.config.num_hidden_layers}
