"""A byte-level tokenizer built locally, for the ``tiny`` model (no hub, no download).

Every UTF-8 byte is one token (a BPE over the 256-symbol ByteLevel alphabet with no merges),
plus ``<pad>``, ``<s>`` and ``</s>``, so any text round-trips and the vocabulary is 259 ids.
It carries a plain-text chat template so code written for instruct models
(``apply_chat_template``) runs unchanged against the tiny stand-in.

    >>> tok = build_byte_tokenizer()
    >>> tok.decode(tok("héllo 🙂")["input_ids"])
    'héllo 🙂'
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"

# Roles and content as plain text; the assistant turn ends with EOS so a trained model learns to
# stop. Newlines are expressions because transformers renders templates with trim_blocks.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """Build the byte-level tokenizer: one token per byte, then pad, bos and eos.

    Saves with ``save_pretrained`` and loads back with ``AutoTokenizer.from_pretrained``.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # Sorted so ids are the same on every machine (the alphabet is a set).
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
