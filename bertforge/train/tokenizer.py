"""WordPiece tokenizers: a shipped BERT vocabulary, or one learned from a corpus, and the ids MLM needs."""

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders
from tokenizers.models import WordPiece
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer
from tokenizers.processors import BertProcessing
from tokenizers.trainers import WordPieceTrainer

from bertforge.train import corpus


def load_tokenizer(path: str | os.PathLike | None = None, lowercase: bool = True) -> Tokenizer:
    """A WordPiece tokenizer from a tokenizer.json, a vocab.txt (lowercased unless told), or a folder holding either
    (tokenizer.json first); the default is the MiniLM checkpoint's bert-base-uncased vocabulary (30,522 ids).

    No truncation, no padding, and special tokens are not matched inside text: "[MASK]" written in a document is
    plain text, never the mask id.
    """
    path = Path(path) if path is not None else corpus.minilm_checkpoint()
    if path.is_dir():
        path = path / "tokenizer.json" if (path / "tokenizer.json").exists() else path / "vocab.txt"
    if not path.exists():
        raise FileNotFoundError(f"tokenizer file does not exist: {path}")
    if path.suffix == ".json":
        spec = json.loads(path.read_text(encoding="utf-8"))
        # Shipped BERT tokenizer.json files pad and truncate to 128 and match "[MASK]" etc. in raw text.
        spec.update(added_tokens=[], truncation=None, padding=None)
        return Tokenizer.from_str(json.dumps(spec))
    return _add_bert_template(_bert_wordpiece(WordPiece.from_file(str(path), unk_token="[UNK]"), lowercase))


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4 of a vocabulary trained here
MIN_TRAINED_VOCAB = 256


def _bert_wordpiece(model: WordPiece, lowercase: bool = True) -> Tokenizer:
    """A BERT WordPiece tokenizer (uncased normalizer, BERT pre-tokenizer) around a WordPiece model."""
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer


def _add_bert_template(tokenizer: Tokenizer) -> Tokenizer:
    vocab = tokenizer.get_vocab()
    if "[CLS]" in vocab and "[SEP]" in vocab:  # as a shipped tokenizer.json does, for encode(a, b) in fine-tuning
        tokenizer.post_processor = BertProcessing(("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"]))
    return tokenizer


def train_tokenizer(documents: Iterable[str], vocab_size: int, progress: bool = True) -> Tokenizer:
    """An uncased BERT WordPiece vocabulary of (at most) `vocab_size` ids learned from `documents`.

    [PAD], [UNK], [CLS], [SEP], [MASK] get ids 0 to 4. Not reproducible bit for bit: the `tokenizers` trainer
    breaks ties between equally frequent merges in hash-map order, which changes from process to process. So
    build_shards learns it once and keeps it with the shards (its tokenizer.json can be passed on as a file).
    """
    if vocab_size < MIN_TRAINED_VOCAB:
        raise ValueError(f"vocab_size must be >= {MIN_TRAINED_VOCAB} to learn word pieces, got {vocab_size}")
    tokenizer = _bert_wordpiece(WordPiece(unk_token="[UNK]"))
    trainer = WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=progress)
    tokenizer.train_from_iterator(documents, trainer)
    return _add_bert_template(tokenizer)


@dataclass(frozen=True, eq=False)
class Vocab:
    """The ids masked-LM training needs, read from a tokenizer's vocabulary."""

    size: int
    pad_id: int
    unk_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    replacement_ids: torch.Tensor  # what a "random token" is drawn from: every id but [PAD], [unused0], ... (any [x])

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> "Vocab":
        vocab = tokenizer.get_vocab()
        ids = {}
        for name in ("PAD", "UNK", "CLS", "SEP", "MASK"):
            if f"[{name}]" not in vocab:
                raise ValueError(f"the tokenizer's vocabulary has no [{name}] token")
            ids[f"{name.lower()}_id"] = vocab[f"[{name}]"]
        plain = sorted(i for token, i in vocab.items() if not (token.startswith("[") and token.endswith("]")))
        return cls(size=tokenizer.get_vocab_size(), replacement_ids=torch.tensor(plain), **ids)

    @property
    def special_ids(self) -> torch.Tensor:
        return torch.tensor([self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id])
