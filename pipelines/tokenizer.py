"""A tiny CLIP-style BPE tokenizer, trained here, so the demo models need no download.

The vocabulary follows CLIP's layout: the 256 byte symbols, the same 256 with the end-of-word marker `</w>`,
one entry per merge, then `<|startoftext|>` and `<|endoftext|>` as the two highest ids. Training is a plain,
deterministic byte-pair count over a built-in corpus of prompt words (ties broken alphabetically), so the
files are identical on every run.
"""

import json
import math
import re
from collections import Counter
from pathlib import Path

END_OF_WORD = "</w>"
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"

CORPUS = """
a photo of an astronaut riding a horse on the moon, masterpiece, best quality, highly detailed
a beautiful landscape with mountains and trees, sunset, golden hour, dramatic lighting, 4k, 8k
portrait of a woman, detailed face, sharp focus, studio lighting, bokeh, cinematic, film grain
a cute cat sitting on a window, soft light, illustration, anime style, digital painting, concept art
futuristic cityscape with neon lights, cyberpunk, rain, night, reflections, octane render, trending
blurry, low quality, worst quality, distorted, deformed, ugly, bad anatomy, watermark, text, signature
oil painting of a castle by the sea, clouds, birds, flowers, forest, river, snow, winter, summer
red blue green yellow black white orange purple pink brown silver gold colorful vibrant pastel
""".lower()


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text)


def train_bpe(corpus: str = CORPUS, num_merges: int = 200) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learns `num_merges` merges; returns (vocab, merges) in CLIP's layout."""
    byte_map = bytes_to_unicode()
    counts = Counter(_words(corpus))
    words = {}
    for word, count in counts.items():
        symbols = [byte_map[b] for b in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        words[tuple(symbols)] = count

    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged_words = {}
        for symbols, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged_words[tuple(out)] = count
        words = merged_words

    base = list(byte_map.values())
    tokens = base + [b + END_OF_WORD for b in base] + ["".join(pair) for pair in merges]
    tokens += [START_TOKEN, END_TOKEN]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return vocab, merges


def write_tokenizer_files(directory: Path) -> None:
    """Writes `vocab.json` and `merges.txt`, the files `CLIPTokenizer.from_pretrained` reads."""
    vocab, merges = train_bpe()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


# T5 ---------------------------------------------------------------------------------------------------------
T5_SPECIAL = ("<pad>", "</s>", "<unk>")  # T5's ids 0, 1, 2
T5_WORD_START = "\u2581"  # SentencePiece's word-start marker


def t5_unigram_vocab(corpus: str = CORPUS) -> list[tuple[str, float]]:
    """A tiny T5-style Unigram vocabulary (piece, log probability) from the same corpus: the special tokens,
    each corpus word with its word-start marker, by frequency (ties alphabetically), then every character, so any
    text tokenizes. `transformers.T5Tokenizer(vocab=...)` builds the tokenizer; its files are saved with it."""
    counts = Counter(_words(corpus))
    total = sum(counts.values())
    vocab = [(token, 0.0) for token in T5_SPECIAL] + [(T5_WORD_START, -2.0)]
    for word, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        vocab.append((T5_WORD_START + word, math.log(count / total)))
    characters = sorted(set(corpus) - set(" \n"))
    vocab += [(character, -12.0) for character in characters]
    return vocab
