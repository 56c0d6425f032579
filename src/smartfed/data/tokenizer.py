"""An offline character-level tokenizer for tests and tiny models.

No hub is reachable here (docs/design.md §5), so the tiny random Llama
models of the tests need a tokenizer built on the spot. This one maps every
printable ASCII character, tab and newline to its own id, behind four special
tokens laid out like Llama's: ``<pad>``=0, ``<s>``=1, ``</s>``=2, ``<unk>``=3.
It is a regular fast tokenizer: it pads, truncates, decodes, applies a chat
template when given one, and survives ``save_pretrained`` /
``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>")
"""Special tokens in id order: pad=0, bos=1, eos=2, unk=3."""

CHARACTERS: tuple[str, ...] = ("\t", "\n", *(chr(code) for code in range(32, 127)))
"""The ordinary tokens, one per character, ids 4.. (tab, newline, printable ASCII)."""

VOCAB_SIZE = len(SPECIAL_TOKENS) + len(CHARACTERS)  # 101, fits a vocab_size=128 model


def char_tokenizer(*, padding_side: str = "right", model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """Build the character-level tokenizer (no files, no downloads).

    Encoding prepends ``<s>`` (as Llama tokenizers do) unless
    ``add_special_tokens=False``; characters outside the vocabulary become
    ``<unk>``; decoding concatenates characters without inserting spaces.

    Args:
        padding_side: ``"right"`` or ``"left"``; settable later as usual.
        model_max_length: what ``truncation=True`` truncates to.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``pad_token``, ``bos_token``,
        ``eos_token`` and ``unk_token`` set and ``len(tokenizer) == VOCAB_SIZE``.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"char_tokenizer(padding_side={padding_side!r}) must be 'right' or 'left'")
    vocab = {token: index for index, token in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # One pre-token per character, newline included ("." would skip it).
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    bos = SPECIAL_TOKENS[1]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=SPECIAL_TOKENS[0],
        bos_token=SPECIAL_TOKENS[1],
        eos_token=SPECIAL_TOKENS[2],
        unk_token=SPECIAL_TOKENS[3],
        padding_side=padding_side,
        model_max_length=model_max_length,
    )
