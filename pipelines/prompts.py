"""Prompts as A1111 reads them: emphasis, `BREAK`, and prompts longer than CLIP's 77 tokens.

A1111's syntax: `(text)` multiplies the attention to `text` by 1.1, `((text))` by 1.21, `[text]` divides it
by 1.1, `(text:1.4)` sets the factor; `\\(`, `\\)`, `\\[`, `\\]` are the literal brackets; a bracket left open
applies to the end of the prompt, a closing one with nothing open is plain text. `BREAK` (upper case) starts
a new chunk.

A1111's "Original" emphasis: the prompt is tokenized into chunks of 75 tokens (a chunk that fills up is cut
after its last comma when that comma is among its last 20 tokens), each chunk gets BOS/EOS and is encoded
alone, its token embeddings are multiplied by their weights and rescaled so that the chunk's mean is
unchanged, and the chunks are concatenated. The negative prompt is encoded the same way and both are padded
to the same number of chunks with the empty prompt's chunk (so are the prompts of a batch).

Why written here: compel (the library diffusers points to) has another syntax and another weighting, so an
A1111 infotext would not give A1111's picture. A prompt that needs none of this (no weight other than 1, no
BREAK, at most 75 tokens) is left to diffusers' own encoding, so it gives exactly the pixels it always did.
"""

import re
from dataclasses import dataclass

import numpy as np
import torch

CHUNK_TOKENS = 75  # tokens per chunk, between its BOS and EOS
COMMA_BACKTRACK = 20  # a full chunk is cut after a comma among its last this many tokens (A1111's default)
ROUND_FACTOR = 1.1
BREAK = "BREAK"
_BREAK_MARK = -1.0  # a BREAK span's weight (as A1111 writes it); `Span.is_break` is what marks it
_BREAK_WORD = re.compile(r"\bBREAK\b")
# The pieces of the syntax: an escaped character, a lone backslash, an opening bracket, `:weight)` closing a
# round bracket, a closing bracket, a run of plain text, a lone colon.
_PIECE = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")


@dataclass
class Span:
    text: str
    weight: float
    is_break: bool = False  # a BREAK between spans (its own flag: a weight of -1 is a weight like any other)


def parse_emphasis(prompt: str) -> list[Span]:
    """The prompt as text spans with their attention weights (adjacent spans of equal weight merged).

    The weights are A1111's to the bit: each closing bracket multiplies the weights of the spans since its
    opening one, in the order the brackets close (the brackets left open last, round then square). Those
    products are recorded while the prompt is read and done at the end on slices of one float64 array: the
    same multiplications, in C. They number brackets x spans at most, 10^8 for a 20,000-character prompt
    (under 0.1 s); rounding depends on their order, so no reordering that would be linear (prefix products,
    say) could give A1111's weights. Everything else is one pass over the prompt."""
    texts: list[str] = []
    breaks: list[int] = []  # where the BREAK spans are
    scalings: list[tuple[int, int, float]] = []  # (first span, span after the last, factor), as brackets close
    open_round: list[int] = []  # where each open bracket's span range starts
    open_square: list[int] = []
    for match in _PIECE.finditer(prompt):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            texts.append(piece[1:])
        elif piece == "(":
            open_round.append(len(texts))
        elif piece == "[":
            open_square.append(len(texts))
        elif weight is not None and open_round and _is_number(weight):
            scalings.append((open_round.pop(), len(texts), float(weight)))
        elif piece == ")" and open_round:
            scalings.append((open_round.pop(), len(texts), ROUND_FACTOR))
        elif piece == "]" and open_square:
            scalings.append((open_square.pop(), len(texts), 1 / ROUND_FACTOR))
        else:
            for index, part in enumerate(_break_parts(piece)):
                if index:
                    breaks.append(len(texts))
                    texts.append(BREAK)
                texts.append(part)
    # Still open at the end: they apply to the rest of the prompt.
    scalings += [(start, len(texts), ROUND_FACTOR) for start in open_round]
    scalings += [(start, len(texts), 1 / ROUND_FACTOR) for start in open_square]
    weights = np.ones(len(texts))
    with np.errstate(over="ignore", invalid="ignore"):  # inf and nan come out as Python's floats would
        for start, stop, factor in scalings:
            weights[start:stop] *= factor
    weights[breaks] = _BREAK_MARK
    is_break = set(breaks)
    merged: list[Span] = []
    merged_texts: list[list[str]] = []  # joined once at the end: `+=` per span would be quadratic
    for index, (text, weight) in enumerate(zip(texts, weights.tolist(), strict=True)):
        if merged and weight == merged[-1].weight and index not in is_break and not merged[-1].is_break:
            merged_texts[-1].append(text)
        else:
            merged.append(Span(text, weight, is_break=index in is_break))
            merged_texts.append([text])
    for span, pieces in zip(merged, merged_texts, strict=True):
        span.text = "".join(pieces)
    return merged or [Span("", 1.0)]


def _break_parts(text: str) -> list[str]:
    r"""`text` split at each word BREAK, the whitespace around it dropped: `re.split(r"\s*\bBREAK\b\s*", text)`,
    which is quadratic on a long run of whitespace that no BREAK follows (`\s` is what `str.strip` strips)."""
    parts = _BREAK_WORD.split(text) if BREAK in text else [text]
    if len(parts) == 1:
        return parts
    return [parts[0].rstrip(), *(part.strip() for part in parts[1:-1]), parts[-1].lstrip()]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def plain_text(spans: list[Span]) -> str:
    """The spans' text without weights; a BREAK leaves a space (its words must not run into each other)."""
    return "".join(" " if span.is_break else span.text for span in spans)


@dataclass
class Chunk:
    tokens: list[int]  # CHUNK_TOKENS + 2: BOS, tokens, EOS, padding
    weights: list[float]


def tokenize_chunks(tokenizer, spans: list[Span]) -> list[Chunk]:
    """A1111's chunking of a parsed prompt for one tokenizer."""
    comma = tokenizer.get_vocab().get(",</w>")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    chunks: list[Chunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close_chunk() -> None:
        nonlocal tokens, weights, last_comma
        filler = CHUNK_TOKENS - len(tokens)
        # BOS, the tokens, EOS, then the tokenizer's padding (for CLIP-L that is EOS again), as diffusers lays
        # out a prompt of up to 75 tokens.
        chunks.append(Chunk([bos, *tokens, eos] + [pad] * filler, [1.0, *weights] + [1.0] * (filler + 1)))
        tokens, weights, last_comma = [], [], -1

    texts = [span.text for span in spans]
    ids_per_span = tokenizer(texts, add_special_tokens=False, truncation=False).input_ids
    for span, ids in zip(spans, ids_per_span, strict=True):
        if span.is_break:
            close_chunk()
            continue
        for token in ids:
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == CHUNK_TOKENS and last_comma != -1 and len(tokens) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                moved_tokens, moved_weights = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                close_chunk()
                tokens, weights = moved_tokens, moved_weights
            if len(tokens) == CHUNK_TOKENS:
                close_chunk()
            tokens.append(token)
            weights.append(span.weight)
    if tokens or not chunks:
        close_chunk()
    return chunks


def needs_own_encoding(pipe, prompt: str) -> bool:
    """Whether `prompt` needs this module's encoder: a weight other than 1, a BREAK, or more than 75 tokens."""
    spans = parse_emphasis(prompt)
    if any(span.is_break or span.weight != 1.0 for span in spans):
        return True
    tokenizer = pipe.tokenizer or pipe.tokenizer_2
    text = plain_text(spans)
    if hasattr(pipe, "maybe_convert_prompt"):  # a loaded multi-vector embedding counts all its tokens
        text = pipe.maybe_convert_prompt(text, tokenizer)
    return len(tokenizer(text, add_special_tokens=False, truncation=False).input_ids) > CHUNK_TOKENS


def without_emphasis(prompt: str) -> str:
    """The text of a prompt whose weights are all 1 (`(x:1.0)` is `x`), for diffusers' own encoding."""
    return plain_text(parse_emphasis(prompt))


def _encoders(pipe) -> list[tuple[object, torch.nn.Module]]:
    pairs = [(getattr(pipe, t, None), getattr(pipe, e, None)) for t, e in
             (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))]  # fmt: skip
    return [(tokenizer, encoder) for tokenizer, encoder in pairs if tokenizer is not None and encoder is not None]


def _is_sdxl(pipe) -> bool:
    return hasattr(pipe, "text_encoder_2")


def _encode_chunk(encoder, tokens: list[int], weights: list[float], clip_skip: int, sdxl: bool):
    """One chunk through one text encoder: its hidden states (A1111's layer for `clip_skip`), weighted with
    the chunk's mean kept, and the pooled output."""
    ids = torch.tensor([tokens], device=encoder.device)
    output = encoder(ids, output_hidden_states=True)
    if sdxl:  # SDXL conditions on the penultimate layer; clip skip counts back from the last
        hidden = output.hidden_states[-(clip_skip + 1)]
    elif clip_skip > 1:
        hidden = encoder.final_layer_norm(output.hidden_states[-clip_skip])
    else:
        hidden = output[0]
    if any(weight != 1.0 for weight in weights):
        original_mean = hidden.mean()
        hidden = hidden * torch.tensor(weights, device=hidden.device, dtype=hidden.dtype).reshape(1, -1, 1)
        weighted_mean = hidden.mean()
        # A1111 divides by the weighted mean unguarded; a mean near zero (random-weight encoders without
        # biases, say) would blow the embeddings up to inf and the image to black, so the rescale is skipped.
        if weighted_mean.abs() > 1e-3 * hidden.abs().mean() and torch.isfinite(original_mean / weighted_mean):
            hidden = hidden * (original_mean / weighted_mean)
    pooled = output[0] if output[0].ndim == 2 else None  # CLIPTextModelWithProjection: the projected output
    return hidden[0], (pooled[0] if pooled is not None else None)


@torch.no_grad()  # not inference_mode: offload hooks move the encoders' weights here (generate.py says why)
def encode_prompts(pipe, prompts: list[str], negative_prompts: list[str], clip_skip: int) -> dict[str, torch.Tensor]:
    """Prompt and negative-prompt embeddings of a batch, as diffusers pipelines take them (`prompt_embeds`,
    `negative_prompt_embeds`, and SDXL's pooled ones), all padded to the same number of chunks with the empty
    prompt's chunk. SDXL: each text encoder encodes its own chunks; their features are concatenated."""
    sdxl = _is_sdxl(pipe)
    texts = prompts + negative_prompts
    chunk_states: list[list[list[torch.Tensor]]] = []  # per encoder, per text: its chunks' hidden states
    empty_states: list[torch.Tensor] = []  # per encoder: the empty prompt's chunk
    pooled: list[torch.Tensor | None] = [None] * len(texts)  # the first chunk's, from the projecting encoder
    dtype = None
    for tokenizer, encoder in _encoders(pipe):
        dtype = encoder.dtype
        per_text = []
        for index, text in enumerate(texts):
            if hasattr(pipe, "maybe_convert_prompt"):  # a multi-vector embedding's token becomes all its tokens
                text = pipe.maybe_convert_prompt(text, tokenizer)
            states = []
            for number, chunk in enumerate(tokenize_chunks(tokenizer, parse_emphasis(text))):
                hidden, chunk_pooled = _encode_chunk(encoder, chunk.tokens, chunk.weights, clip_skip, sdxl)
                states.append(hidden)
                if number == 0 and chunk_pooled is not None and pooled[index] is None:
                    pooled[index] = chunk_pooled
            per_text.append(states)
        chunk_states.append(per_text)
        empty = tokenize_chunks(tokenizer, [Span("", 1.0)])[0]
        empty_states.append(_encode_chunk(encoder, empty.tokens, empty.weights, clip_skip, sdxl)[0])
    longest = max(len(states) for per_text in chunk_states for states in per_text)
    sequences = []
    for index in range(len(texts)):
        features = []
        for per_text, empty in zip(chunk_states, empty_states, strict=True):
            states = per_text[index] + [empty] * (longest - len(per_text[index]))
            features.append(torch.cat(states, dim=0))
        sequences.append(torch.cat(features, dim=-1))
    embeds = torch.stack(sequences).to(dtype=dtype)
    count = len(prompts)
    arguments = {"prompt_embeds": embeds[:count], "negative_prompt_embeds": embeds[count:]}
    if sdxl:
        stacked = torch.stack(pooled).to(dtype=dtype)
        arguments.update(pooled_prompt_embeds=stacked[:count], negative_pooled_prompt_embeds=stacked[count:])
    return arguments
