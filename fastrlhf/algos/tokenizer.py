"""A character-level tokenizer built in code, for the embedded default model (nothing is downloaded).

One token per printable ASCII character (plus newline) and four specials, wrapped in
``transformers.PreTrainedTokenizerFast`` so it behaves like any Hugging Face tokenizer:
``save_pretrained`` / ``AutoTokenizer.from_pretrained`` round-trip, padding, batch decode.
"""

from __future__ import annotations

import string

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# string.printable minus the exotic whitespace; "\n" kept for multi-line prompts.
CHARACTERS = tuple(c for c in string.printable if c not in "\t\r\x0b\x0c")


def build_char_tokenizer(padding_side: str = "left"):
    """A ``PreTrainedTokenizerFast`` with ids ``<pad>=0, <s>=1, </s>=2, <unk>=3``, then one id per character.

    ``padding_side="left"`` suits generation (prompts end at the same position).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # Every character is its own "word"; Fuse joins them back without separators.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side=padding_side,
    )
