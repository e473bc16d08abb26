"""Real MLM batches for the benchmarks: news paragraphs, WordPiece-tokenized with the MiniLM vocabulary."""

import functools

import torch

from bertforge.train.corpus import minilm_checkpoint, news_articles


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
    BERT masking: `mask_fraction` of the real, non-special tokens get a label; of those 80% become [MASK],
    10% a random token, 10% stay. Labels are -100 everywhere else.
    """
    gen = torch.Generator().manual_seed(seed)
    paragraphs = _paragraphs()
    chosen = torch.randint(len(paragraphs), (batch_size,), generator=gen).tolist()
    tokenizer = _tokenizer()
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    encodings = tokenizer.encode_batch([paragraphs[i] for i in chosen])
    seqlen = max(len(e.ids) for e in encodings)
    input_ids = torch.zeros(batch_size, seqlen, dtype=torch.long)  # [PAD] is 0
    special = torch.ones(batch_size, seqlen, dtype=torch.bool)
    for row, e in enumerate(encodings):
        input_ids[row, : len(e.ids)] = torch.tensor(e.ids)
        special[row, : len(e.ids)] = torch.tensor(e.special_tokens_mask, dtype=torch.bool)
    attention_mask = (torch.arange(seqlen)[None, :] < torch.tensor([len(e.ids) for e in encodings])[:, None]).long()

    labelled = (torch.rand(input_ids.shape, generator=gen) < mask_fraction) & ~special
    labels = torch.where(labelled, input_ids, torch.full_like(input_ids, -100))
    action = torch.rand(input_ids.shape, generator=gen)
    vocab_size = tokenizer.get_vocab_size()
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=gen)
    masked_ids = torch.where(action < 0.8, torch.full_like(input_ids, tokenizer.token_to_id("[MASK]")),
                             torch.where(action < 0.9, random_ids, input_ids))
    input_ids = torch.where(labelled, masked_ids, input_ids)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "token_type_ids": torch.zeros_like(input_ids), "labels": labels}
