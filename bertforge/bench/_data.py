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


LENGTHS = ("corpus", "uniform", "full")


def news_mlm_batch(batch_size=32, max_length=128, mask_fraction=0.15, seed=0, lengths="corpus"):
    """A padded MLM batch of real news text: dict of input_ids, attention_mask, token_type_ids, labels.

    lengths "corpus": `batch_size` paragraphs (the newline-separated parts of each article in `news_articles()`:
    titles, subtitles, bodies) drawn uniformly at random with `seed`, tokenized to [CLS] ... [SEP] with the MiniLM
    tokenizer.json, truncated to `max_length`, padded to the longest. "uniform": each row's length drawn uniformly
    from [max_length // 3, max_length]; "full": every row max_length; both filled with the corpus' tokens from a
    random paragraph on, across paragraph ends, between [CLS] and [SEP].
    Masked as in pre-training (bertforge.train.mlm.mask_tokens): round(mask_fraction * n) of each row's n real,
    non-special tokens get a label; of those 80% become [MASK], 10% a random token, 10% stay; IGNORE_INDEX elsewhere.
    """
    if lengths not in LENGTHS:
        raise ValueError(f"lengths must be one of {LENGTHS}, got {lengths!r}")
    gen = torch.Generator().manual_seed(seed)
    paragraphs = _paragraphs()
    tokenizer = _tokenizer()
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    if lengths == "corpus":
        chosen = torch.randint(len(paragraphs), (batch_size,), generator=gen).tolist()
        rows = [e.ids for e in tokenizer.encode_batch([paragraphs[i] for i in chosen])]
    else:
        low = max_length // 3 if lengths == "uniform" else max_length
        sizes = torch.randint(low, max_length + 1, (batch_size,), generator=gen).tolist()
        cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        rows = []
        for size in sizes:
            start, body = int(torch.randint(len(paragraphs), (1,), generator=gen)), []
            while len(body) < size - 2:
                body += tokenizer.encode(paragraphs[start % len(paragraphs)]).ids[1:-1]
                start += 1
            rows.append([cls, *body[:size - 2], sep])
    row_lengths = torch.tensor([len(r) for r in rows])
    input_ids = torch.zeros(batch_size, int(row_lengths.max()), dtype=torch.long)  # [PAD] is 0
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
    attention_mask = (torch.arange(input_ids.shape[1])[None, :] < row_lengths[:, None]).long()
    input_ids, labels = mask_tokens(input_ids, Vocab.from_tokenizer(tokenizer), gen, mask_fraction)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "token_type_ids": torch.zeros_like(input_ids), "labels": labels}
