"""A1111's prompt emphasis, BREAK and long prompts (pipelines/prompts.py), down to the pixels on the demo models."""

import random
import re

import numpy as np
import pytest
from PIL import Image

from pipelines.prompts import CHUNK_TOKENS, Span, parse_emphasis, tokenize_chunks
from pipelines.schemas import Txt2ImgRequest


def spans(prompt: str) -> list[tuple[str, float]]:
    return [(span.text, round(span.weight, 4)) for span in parse_emphasis(prompt)]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "[less] ((more)) (set:1.4) (x:0.5)",
            [("less", 0.9091), (" ", 1.0), ("more", 1.21), (" ", 1.0), ("set", 1.4), (" ", 1.0), ("x", 0.5)],
        ),  # fmt: skip
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.573),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641),
                (".", 1.1),
            ],
        ),  # fmt: skip
        ("closing) with nothing open]", [("closing) with nothing open]", 1.0)]),
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("(text:bad)", [("text:bad", 1.1)]),
    ],
)
def test_emphasis_syntax_as_a1111_parses_it(prompt, expected):
    assert spans(prompt) == expected


def test_chunks_of_75_tokens_cut_after_a_late_comma_and_at_break(engine):
    tokenizer = engine.load("Demo SD1.5").pipe.tokenizer
    comma = tokenizer.get_vocab()[",</w>"]
    words = ["a"] * 70 + [","] + ["b"] * 10  # the comma is the 71st token: the chunk is cut after it
    chunks = tokenize_chunks(tokenizer, [Span(" ".join(words), 1.0)])
    assert len(chunks) == 2 and all(len(chunk.tokens) == CHUNK_TOKENS + 2 for chunk in chunks)
    assert chunks[0].tokens[71] == comma and chunks[0].tokens[72] == tokenizer.eos_token_id
    assert chunks[1].tokens[1:11] == chunks[0].tokens[0:0] + [tokenizer.convert_tokens_to_ids("b</w>")] * 10
    broken = tokenize_chunks(tokenizer, parse_emphasis("a cat BREAK a dog"))
    assert len(broken) == 2 and broken[1].tokens[1] == tokenizer.convert_tokens_to_ids("a</w>")
    weighted = tokenize_chunks(tokenizer, parse_emphasis("a (cat:1.5)"))[0]
    assert weighted.weights[:4] == [1.0, 1.0, 1.5, 1.0]


def tiny(**fields) -> Txt2ImgRequest:
    base = {"prompt": "a red fox in the snow", "steps": 6, "width": 64, "height": 64, "seed": 99}
    return Txt2ImgRequest(**{**base, **fields})


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


@pytest.mark.parametrize("model", ["Demo SD1.5", "Demo SDXL"])
def test_weight_one_is_the_plain_prompt_and_other_weights_change_the_image(engine, model):
    plain = engine.generate(tiny(model=model, prompt="a red fox in the snow"))
    same = engine.generate(tiny(model=model, prompt="a (red fox:1.0) in the snow"))
    stronger = engine.generate(tiny(model=model, prompt="a (red fox:1.5) in the snow"))
    assert np.array_equal(pixels(plain.image), pixels(same.image))
    assert not np.array_equal(pixels(plain.image), pixels(stronger.image))
    assert stronger.infotext.startswith("a (red fox:1.5) in the snow\n")  # the prompt as written


@pytest.mark.parametrize("model", ["Demo SD1.5", "Demo SDXL"])
def test_a_long_prompt_uses_its_tail(engine, model):
    head = ", ".join(["a mountain"] * 40)  # 119 tokens: the tail is past the first chunk
    first = engine.generate(tiny(model=model, prompt=f"{head}, a lake"))
    second = engine.generate(tiny(model=model, prompt=f"{head}, a desert"))
    assert not np.array_equal(pixels(first.image), pixels(second.image))
    assert not any("tokens" in warning for warning in first.warnings)


def test_negative_prompt_emphasis_and_break_change_the_image(engine):
    plain = engine.generate(tiny(negative_prompt="blurry, dark"))
    weighted = engine.generate(tiny(negative_prompt="(blurry:1.6), dark"))
    broken = engine.generate(tiny(prompt="a red fox BREAK in the snow"))
    reference = pixels(plain.image)
    assert pixels(weighted.image).std() > 0 and pixels(broken.image).std() > 0  # not a black (NaN) image
    assert not np.array_equal(reference, pixels(weighted.image))
    assert not np.array_equal(reference, pixels(broken.image))


def test_jobs_with_prompts_of_different_lengths_still_batch(engine):
    loaded = engine.load("Demo SD1.5")
    long_prompt = ", ".join(["a mountain"] * 40)
    jobs = [engine.prepare(tiny(prompt=long_prompt, seed=1), loaded.entry),
            engine.prepare(tiny(prompt="(a fox:1.2)", seed=2), loaded.entry)]  # fmt: skip
    results = engine.run(loaded, jobs)
    assert [result.batch_size for result in results] == [2, 2]
    assert [result.image.size for result in results] == [(64, 64), (64, 64)]
    alone = engine.generate(tiny(prompt=long_prompt, seed=1))
    assert np.array_equal(pixels(alone.image), pixels(results[0].image)) or (
        np.abs(pixels(alone.image) - pixels(results[0].image)).max() <= 2
    )


# The weights are A1111's to the bit: checked against A1111's algorithm as this module had it (each closing
# bracket multiplies every span since its opening one, at once), which is quadratic, so on short prompts.
_REFERENCE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_REFERENCE_PIECE = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")


def reference_emphasis(prompt: str) -> list[tuple[str, float, bool]]:
    spans: list[list] = []  # [text, weight, is_break]
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for span in spans[start:]:
            if not span[2]:
                span[1] *= factor

    for match in _REFERENCE_PIECE.finditer(prompt):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            spans.append([piece[1:], 1.0, False])
        elif piece in "([":
            (open_round if piece == "(" else open_square).append(len(spans))
        elif weight is not None and open_round and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)", weight):
            scale_from(open_round.pop(), float(weight))
        elif piece == ")" and open_round:
            scale_from(open_round.pop(), 1.1)
        elif piece == "]" and open_square:
            scale_from(open_square.pop(), 1 / 1.1)
        else:
            for index, part in enumerate(_REFERENCE_BREAK.split(piece)):
                if index:
                    spans.append(["BREAK", -1.0, True])
                spans.append([part, 1.0, False])
    for start in open_round:
        scale_from(start, 1.1)
    for start in open_square:
        scale_from(start, 1 / 1.1)
    merged: list[list] = []
    for span in spans:
        if merged and span[1] == merged[-1][1] and not span[2] and not merged[-1][2]:
            merged[-1][0] += span[0]
        else:
            merged.append(span)
    return [tuple(span) for span in merged] or [("", 1.0, False)]


@pytest.mark.parametrize(
    "prompt",
    ["a ((house:1.3)) [[on]] (a (hill:0.5):1.2), sun", "([a) b] c", "((a:1.3):0.7)", "[(a:1.5)] BREAK \\(x\\) (b",
     "(a [b (c:0.3) d] e:1.7) f]", "  BREAK  x BREAK BREAK ", "a\u00a0BREAK\u00a0b", "(:1.) (x: .5 ) (y:+2)"],
)  # fmt: skip
def test_weights_are_the_reference_algorithms_to_the_bit(prompt):
    assert [(span.text, span.weight, span.is_break) for span in parse_emphasis(prompt)] == reference_emphasis(prompt)


def test_weights_match_the_reference_on_random_prompts():
    pieces = ["(", ")", "[", "]", "\\", "\\(", "a", "b ", " ", "BREAK", " BREAK ", ":", ":1.3)", ": 0.7 )", ":x)",
              ",", "\n", "xBREAK", ":1.)", ":.5)"]  # fmt: skip
    generator = random.Random(5)
    for _ in range(3000):
        prompt = "".join(generator.choice(pieces) for _ in range(generator.randint(0, 40)))
        expected = reference_emphasis(prompt)
        assert [(span.text, span.weight, span.is_break) for span in parse_emphasis(prompt)] == expected, prompt
