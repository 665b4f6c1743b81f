"""A small CLIP BPE tokenizer built from an in-code vocabulary (no downloads).

Every byte-level character is a token (so any prompt tokenizes), and the words the demo and the
procedural training captions use are whole tokens, reached through merges built left to right.
"""

from __future__ import annotations

from transformers import CLIPTokenizer

WORDS = (
    "a an the of on in with and photo picture image drawing painting small large big tiny "
    "red green blue yellow orange purple pink white black gray grey brown cyan magenta "
    "circle square triangle star cross ring diamond heart background shape "
    "cat dog house tree car boat flower mountain sky sea city street portrait landscape"
).split()

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def byte_chars() -> list[str]:
    # GPT-2 / CLIP byte-to-unicode table: printable stand-ins for all 256 bytes.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def learn_bpe(
    words: tuple[str, ...] | list[str], alphabet: list[str], end_of_word: str = ""
) -> tuple[list[str], list[tuple[str, str]]]:
    """The tokens (``alphabet`` first, then one per merge) and the merges that turn every word into one
    token; ``end_of_word`` marks a word's last symbol (CLIP's ``</w>``; byte-level BPE has none)."""
    tokens = list(dict.fromkeys(alphabet))
    seen = set(tokens)
    # Learn merges as BPE training does (most frequent pair first) so that applying them in rank
    # order turns every listed word into one token.
    merges: list[tuple[str, str]] = []
    words_as_parts = [list(w[:-1]) + [w[-1] + end_of_word] for w in dict.fromkeys(words)]
    while True:
        counts: dict[tuple[str, str], int] = {}
        for parts in words_as_parts:
            for pair in zip(parts, parts[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = max(counts, key=lambda pair: (counts[pair], -len(merges)))
        merges.append(best)
        if best[0] + best[1] not in seen:
            seen.add(best[0] + best[1])
            tokens.append(best[0] + best[1])
        for i, parts in enumerate(words_as_parts):
            words_as_parts[i] = _merge(parts, best)
    return tokens, merges


def vocab_and_merges(
    words: tuple[str, ...] | list[str] = WORDS,
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    chars = byte_chars()
    tokens, merges = learn_bpe(words, chars + [ch + "</w>" for ch in chars], end_of_word="</w>")
    tokens += [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def _merge(parts: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
            out.append(parts[i] + parts[i + 1])
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return out


def build_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    vocab, merges = vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
