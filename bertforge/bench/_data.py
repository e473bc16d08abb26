"""Real MLM batches for the benchmarks: news paragraphs, WordPiece-tokenized with the MiniLM vocabulary."""

import functools

import torch

from bertforge.train.corpus import minilm_checkpoint, news_articles
from bertforge.train.mlm import mask_tokens
from bertforge.train.tokenizer import Vocab


@functools.lru_cache(maxsize=1)
def _paragraphs():
    return [p for article in news_articles() for p in article.split("\n")]


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(minilm_checkpoint() / "tokenizer.json"))


def news_mlm_batch(batch_size=32, max_length=128, mask_fraction=0.15, seed=0):
    """A padded MLM batch of real news paragraphs: dict of input_ids, attention_mask, token_type_ids, labels.

    Lengths come from the corpus: `batch_size` paragraphs (the newline-separated parts of each article in
    `news_articles()`: titles, subtitles, bodies) are drawn uniformly at random with `seed`, tokenized to
    [CLS] ... [SEP] with the MiniLM tokenizer.json, truncated to `max_length`, and padded to the longest.
    Masked as in pre-training (bertforge.train.mlm.mask_tokens): round(mask_fraction * n) of each row's n real,
    non-special tokens get a label; of those 80% become [MASK], 10% a random token, 10% stay; IGNORE_INDEX elsewhere.
    """
    gen = torch.Generator().manual_seed(seed)
    paragraphs = _paragraphs()
    chosen = torch.randint(len(paragraphs), (batch_size,), generator=gen).tolist()
    tokenizer = _tokenizer()
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    encodings = tokenizer.encode_batch([paragraphs[i] for i in chosen])
    lengths = torch.tensor([len(e.ids) for e in encodings])
    input_ids = torch.zeros(batch_size, int(lengths.max()), dtype=torch.long)  # [PAD] is 0
    for row, e in enumerate(encodings):
        input_ids[row, : len(e.ids)] = torch.tensor(e.ids)
    attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
    input_ids, labels = mask_tokens(input_ids, Vocab.from_tokenizer(tokenizer), gen, mask_fraction)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "token_type_ids": torch.zeros_like(input_ids), "labels": labels}
