"""Every parser of user text runs in time linear in the text: adversarial inputs at the request limits parse
well under a second (the quadratic and worse parsers these replace took seconds to hours on them, with the
GIL held, so the replica stopped answering its health checks). Each case checks the result too."""

import itertools
import math
import operator
import random
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipelines import a1111, loras
from pipelines.embeddings import EmbeddingFile, rewrite_prompt
from pipelines.infotext import parse_infotext
from pipelines.limits import LIMITS
from pipelines.loras import LoraLibrary, find_lora_tags, parse_prompt_loras, replace_lora_tags
from pipelines.prompts import BREAK, parse_emphasis
from pipelines.settings import Settings

N = LIMITS.max_prompt_chars  # prompts: the longest a request may send
# png-info's infotext is bounded only by the 32 MiB request body. A linear parser's time grows with the text
# at the same rate however long it is, so 200,000 characters (ten times a prompt) shows it; the old parser
# took minutes on these already (~n^2.5).
INFOTEXT_CHARS = 200_000
BOUND_S = 1.0  # the old parsers took minutes to hours here: a margin no machine's noise reaches


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    elapsed = time.perf_counter() - start
    assert elapsed < BOUND_S, f"{function.__name__} took {elapsed:.2f} s"
    return result


# <lora:...> tags ------------------------------------------------------------------------------------------
def split_warning(tag: str) -> str:
    return (f"prompt tag {tag!r} skipped: separate text-encoder/UNet weights are not supported; write "
            "<lora:name:weight>")  # fmt: skip


@pytest.mark.parametrize(
    "prompt",
    [
        "<lora:" + ":" * (N - 6),  # cubic for `<lora:[^>]*:[^>]*:[^>]*>`
        ("<lora:a:" * N)[:N],
        ("<lora:" * N)[:N],  # each start re-scanned the rest for a '>'
        ("<lora:a" * N)[:N],
    ],
)
def test_unclosed_tags_are_text(prompt):
    assert timed(parse_prompt_loras, prompt) == (prompt, [], [])


def test_one_long_tag_with_many_colons_is_one_split_weight_tag():
    prompt = ("<lora:" * N)[: N - 1] + ">"
    clean, found, warnings = timed(parse_prompt_loras, prompt)
    assert (clean, found, warnings) == ("", [], [split_warning(prompt)])


def test_tags_beyond_max_loras_are_removed_with_one_warning():
    count = N // len("<lora:x:1>")
    clean, found, warnings = timed(parse_prompt_loras, "<lora:x:1>" * count)
    assert clean == "" and found == [("x", 1.0)] * LIMITS.max_loras
    assert warnings == [f"{count} <lora:...> tags in the prompt; at most {LIMITS.max_loras} per job: skipped the "
                        f"other {count - LIMITS.max_loras} ('x')"]  # fmt: skip


def test_the_cap_counts_tags_in_prompt_order_and_names_each_skipped_lora_once():
    tags = [f"<lora:l{index % 10}:{index % 3}>" for index in range(LIMITS.max_loras + 12)]
    clean, found, warnings = parse_prompt_loras("a cat, " + ", ".join(tags) + ", on a mat")
    assert clean == "a cat, on a mat"
    assert found == [(f"l{index % 10}", float(index % 3)) for index in range(LIMITS.max_loras)]
    skipped = ", ".join(repr(f"l{index}") for index in dict.fromkeys(i % 10 for i in range(LIMITS.max_loras, 20)))
    assert warnings == [f"{len(tags)} <lora:...> tags in the prompt; at most {LIMITS.max_loras} per job: skipped "
                        f"the other 12 ({skipped})"]  # fmt: skip


def test_split_weight_tags_beyond_max_loras_get_one_warning():
    count = N // len("<lora:a:b:c>")
    clean, found, warnings = timed(parse_prompt_loras, "<lora:a:b:c>" * count)
    assert clean == "" and found == []
    assert warnings == [split_warning("<lora:a:b:c>")] * LIMITS.max_loras + [
        f"{count - LIMITS.max_loras} more prompt tags with separate text-encoder/UNet weights skipped"
    ]


@pytest.mark.parametrize(
    ("prompt", "clean"),
    [
        ("a" + "\n" * N + "b", "a" + "\n" * N + "b"),  # `\s*,` re-scanned the run from each of its positions
        ("a" + "\n" * N + "x, b", "a" + "\n" * N + "x, b"),
        (" " * N, ""),
        (", " * (N // 2), ""),
        ((", ,  ," * N)[:N], ""),
        ("a" + ("\t\n" * N)[:N] + ", ,b", "a, b"),
        ("a" + " \n," * (N // 3) + "b", "a, b"),
    ],
)
def test_separator_clean_up_is_linear(prompt, clean):
    assert timed(parse_prompt_loras, prompt)[0] == clean


# The regular expressions the scanners replace, as the reference on small texts (fast enough there).
OLD_SPLIT_WEIGHTS = re.compile(r"<lora:[^>]*:[^>]*:[^>]*>")
OLD_DOUBLED_COMMAS = re.compile(r"\s*,\s*(,\s*)+")


def test_the_scanners_find_what_the_regular_expressions_did():
    pieces = ["<lora:", ">", ":", "a", "0.5", " ", ",", "\n", "<", "x", "nan", " , ,", "\u00a0"]
    generator = random.Random(7)
    for _ in range(5000):
        text = "".join(generator.choice(pieces) for _ in range(generator.randint(0, 24)))
        tags = [(tag.start, tag.end, tag.name, tag.weight) for tag in find_lora_tags(text)]
        assert tags == [(m.start(), m.end(), m[1], m[2]) for m in loras.PROMPT_LORA_TAG.finditer(text)], text
        spans = [(m.start(), m.end()) for m in OLD_SPLIT_WEIGHTS.finditer(text)]
        assert loras._split_weight_tags(text) == spans, text
        assert loras._DOUBLED_COMMAS.sub(", ", text) == OLD_DOUBLED_COMMAS.sub(", ", text), text
        assert replace_lora_tags(text, lambda tag: f"[{tag.name}]") == loras.PROMPT_LORA_TAG.sub(
            lambda m: f"[{m[1]}]", text
        )


# One listing of the LoRA folder per request --------------------------------------------------------------
@pytest.fixture
def library(tmp_path, monkeypatch) -> tuple[LoraLibrary, list[int]]:
    """A LoRA folder with three small SD1.5 LoRAs, and a count of the folder scans."""
    folder = tmp_path / "loras"
    folder.mkdir()
    for name in ("ink", "oil", "sketch"):
        save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(1, 4)}, str(folder / f"{name}.safetensors"))
    settings = Settings.from_env(root=tmp_path).model_copy(update={"loras_dir": folder, "cache_dir": tmp_path})
    library = LoraLibrary(settings)
    scans = [0]
    files = library._files

    def counted() -> list[tuple[str, Path]]:
        scans[0] += 1
        return files()

    monkeypatch.setattr(library, "_files", counted)
    return library, scans


def test_plan_scans_the_folder_once_for_all_names(library):
    lora_library, scans = library
    plan = lora_library.plan(["ink", "oil"], "a cat <lora:sketch:0.5> <lora:INK>", None, "txt2img")
    assert [(use.lora.name, use.scale) for use in plan.uses] == [("ink", 1.0), ("oil", 1.0), ("sketch", 0.5)]
    assert plan.warnings == ["LoRA 'ink' is given more than once; used once, at its first scale (1)"]
    assert scans == [1]
    files = lora_library.listing()
    assert [name for name, _ in files] == ["ink", "oil", "sketch"]
    assert lora_library.resolve("oil.safetensors", files=files).name == "oil" and scans == [2]


def test_a1111_door_looks_up_at_most_max_loras_tags_against_one_listing(library):
    lora_library, scans = library
    count = N // len("<lora:nope:1>")
    warnings: list[str] = []
    prompt = timed(a1111.without_unknown_loras, "<lora:ink:1>" + "<lora:nope:1>" * count, lora_library, warnings)
    assert prompt == "<lora:ink:1>" and scans == [1]
    assert warnings == ["LoRA 'nope' is not installed; its prompt tag was skipped (see GET /sdapi/v1/loras)"] * (
        LIMITS.max_loras - 1
    ) + [f"{count + 1} <lora:...> tags in the prompt; at most {LIMITS.max_loras} per job: the last "
         f"{count + 1 - LIMITS.max_loras} were removed"]  # fmt: skip


def test_a1111_door_keeps_installed_tags_and_leaves_three_part_tags_to_the_native_parser(library):
    lora_library, scans = library
    warnings: list[str] = []
    prompt = a1111.without_unknown_loras("a <lora:ink:0.5>, <lora:gone>, <lora:oil:1:2> b", lora_library, warnings)
    assert prompt == "a <lora:ink:0.5>, , <lora:oil:1:2> b" and scans == [1]
    assert warnings == ["LoRA 'gone' is not installed; its prompt tag was skipped (see GET /sdapi/v1/loras)"]
    untouched: list[str] = []
    assert a1111.without_unknown_loras("no tags", lora_library, untouched) == "no tags" and scans == [1]


# Infotext (png-info) --------------------------------------------------------------------------------------
STEPS_LINE = "Steps: 1, Sampler: Euler, CFG scale: 7"


@pytest.mark.parametrize(
    ("last_line", "pairs"),
    [
        ("a" * INFOTEXT_CHARS, {}),  # each start re-scanned the run of key characters
        (("a b " * INFOTEXT_CHARS)[:INFOTEXT_CHARS], {}),
        ("a:" * (INFOTEXT_CHARS // 2), {}),  # keys of one character are not keys
        ("ab:" * (INFOTEXT_CHARS // 3), {}),  # one pair only: not a parameter line
        ('"' * INFOTEXT_CHARS, {}),
        ('ab: "' + '\\"' * (INFOTEXT_CHARS // 2), {}),
        ("Steps: 1, " * (INFOTEXT_CHARS // 10), {"Steps": "1"}),
        ('ab: "x, ' * (INFOTEXT_CHARS // 8), {"ab": '"x'}),
        (STEPS_LINE + ", Note: " + "x" * INFOTEXT_CHARS, {"Steps": "1", "Note": "x" * INFOTEXT_CHARS}),
        (STEPS_LINE + ', Note: "' + "\\\\" * (INFOTEXT_CHARS // 2) + '"', {"Note": "\\" * (INFOTEXT_CHARS // 2)}),
    ],
)
def test_infotext_parameter_lines_parse_in_linear_time(last_line, pairs):
    parsed = timed(parse_infotext, "a cat\n" + last_line)
    assert {key: parsed[key] for key in pairs} == pairs
    assert parsed["Prompt"] == ("a cat" if pairs else "a cat\n" + last_line.strip())


def test_infotext_prompt_lines_are_joined_once():
    lines = INFOTEXT_CHARS // 2
    parsed = timed(parse_infotext, "x\n" * lines + "Negative prompt: y\n" + "y\n" * lines + STEPS_LINE)
    assert parsed["Prompt"] == "\n".join(["x"] * lines) and parsed["Negative prompt"] == "\n".join(["y"] * (lines + 1))


# Emphasis and BREAK ---------------------------------------------------------------------------------------
def spans(prompt: str) -> list[tuple[str, float, bool]]:
    return [(span.text, span.weight, span.is_break) for span in timed(parse_emphasis, prompt)]


def repeated_product(factor: float, times: int) -> float:
    weight = 1.0
    for _ in range(times):
        weight *= factor
    return weight


def test_brackets_without_text_and_text_under_many_brackets():
    assert spans("(" * (N // 2) + ")" * (N // 2)) == [("", 1.0, False)]
    assert spans("[" * (N // 2) + "]" * (N // 2)) == [("", 1.0, False)]
    # The most multiplications a prompt can ask for: every span under every bracket (1.1^10000 is inf).
    assert spans("(" * (N // 2) + ":" * (N // 2)) == [(":" * (N // 2), math.inf, False)]
    depth = N // 4  # one span per ':' and per 'a', all under the same brackets: merged into one
    assert spans("(" * depth + "a:" * (N // 4) + ")" * depth) == [
        ("a:" * (N // 4), repeated_product(1.1, depth), False)
    ]


def test_nested_brackets_each_with_text():
    depth = N // 3
    result = spans("(a" * depth + ")" * depth)
    assert [text for text, _, _ in result] == ["a"] * depth
    assert [weight for _, weight, _ in result[:3]] == [1.1, repeated_product(1.1, 2), repeated_product(1.1, 3)]
    assert result[-1][1] == repeated_product(1.1, depth)


def test_nested_explicit_weights_multiply_in_closing_order():
    depth = N // 9
    # In the order the brackets close; around 1, so that the products stay finite and apart.
    factors = [("0.97", "1.01", "0.98", "1.02", "0.99", "1.03")[index % 6] for index in range(depth)]
    result = spans("(a" * depth + "".join(f":{factor})" for factor in factors))
    assert [text for text, _, _ in result] == ["a"] * depth
    for index in (0, 1, depth // 2, depth - 1):  # span i is under the brackets that close last, depth - i of them
        weight = 1.0
        for factor in factors[depth - 1 - index :]:
            weight *= float(factor)
        assert result[index][1] == weight


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        (" " * (N - 7) + "x BREAK", [(" " * (N - 7) + "x", 1.0, False), (BREAK, -1.0, True), ("", 1.0, False)]),
        ("\n" * N, [("\n" * N, 1.0, False)]),  # `\s*\bBREAK\b` re-scanned the run from each position
        (
            ("a " * N)[: N - 6] + " BREAK",
            [(("a " * N)[: N - 6].rstrip(), 1.0, False), (BREAK, -1.0, True), ("", 1.0, False)],
        ),
        ("\\\\" * (N // 2), [("\\" * (N // 2), 1.0, False)]),
        ("\\a" * (N // 2), [("a" * (N // 2), 1.0, False)]),  # a lone backslash is dropped
        ("a:" * (N // 2), [("a:" * (N // 2), 1.0, False)]),
        (":" + " " * (N - 2) + "1", [(":" + " " * (N - 2) + "1", 1.0, False)]),
    ],
)
def test_emphasis_pieces_at_the_limit(prompt, expected):
    assert spans(prompt) == expected


def test_brackets_left_open_apply_to_the_rest_in_opening_order():
    result = spans(("(:1" * N)[:N])  # `:1` closes nothing: every bracket stays open to the end
    count = N // 3
    assert [text for text, _, _ in result] == [":1"] * count + [":"]
    assert [weight for _, weight, _ in result] == list(itertools.accumulate([1.1] * (count + 1), operator.mul))


# Embedding names ------------------------------------------------------------------------------------------
def test_embedding_names_are_found_in_time_linear_in_the_prompt():
    # One search per installed embedding (the folder bounds how many), each linear in the prompt.
    near_misses = [EmbeddingFile("a" * 199 + suffix, Path(f"{suffix}.pt"), "sd15") for suffix in "bcdefgh"]
    exact = EmbeddingFile("a" * 200, Path("a.pt"), "sd15")
    prompt = ("a" * 200 + " ") * (N // 201)
    rewritten = timed(rewrite_prompt, prompt, [*near_misses, exact], [])
    assert rewritten == (f"<ti-{'a' * 200}> " * (N // 201))
