"""The tokenizer of an export as files a non-Python app can use: ``vocab.json``, ``merges.txt``, ``tokenizer.json``.

open_clip's `SimpleTokenizer` is OpenAI CLIP's byte-level BPE. What it does to a string, in order (open_clip 3.3,
``open_clip/tokenizer.py``; ``tokenizer.json`` spells the same steps out for an implementer):

1. clean (``clean="lower"``): ``ftfy.fix_text`` (default settings), ``html.unescape`` twice, strip, collapse runs
   of Unicode whitespace to one space (``" ".join(text.split())``), lower-case (Python's ``str.lower``: Unicode
   full case mapping, no locale);
2. pre-split with ``pattern`` (the ``regex`` package's syntax, ``\\p{L}`` / ``\\p{N}`` are Unicode letters /
   numbers; IGNORECASE): a special token, an English contraction, a run of letters, *one* digit, or a run of
   other non-space characters;
3. each piece that is not a special token: its UTF-8 bytes mapped to characters by ``byte_to_unicode``, the last
   character suffixed with ``</w>``, then BPE: repeatedly merge the adjacent pair with the lowest rank (its line
   in ``merges.txt``, counting from 0 after the header) until no pair has a rank; the symbols' ids from
   ``vocab.json``. A special token's piece is its own id;
4. ``[start_of_text] + ids + [end_of_text]``; longer than ``context_length``: keep the first ``context_length``
   and overwrite the last with end-of-text; pad on the right with ``padding_id`` (0, which is also the id of
   ``!``: a model finds the end by the end-of-text id, the largest id in the row).

Only ftfy has no port: ``tokenizer.json`` lists its fixes that can change a caption, in its order and with its
tables; all but mojibake repair (a heuristic) can be applied exactly by an app (docs/export.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VOCAB = "vocab.json"
MERGES = "merges.txt"
CONFIG = "tokenizer.json"
FILES = {
    VOCAB: "BPE vocabulary: token -> id (byte-level symbols, `</w>` ends a word, special tokens last)",
    MERGES: "BPE merges, one `left right` pair a line, lowest rank first (after a `#version` header)",
    CONFIG: "tokenizer settings: context length, special and padding ids, cleaning, pre-split pattern, truncation",
}
MERGES_HEADER = "#version: 0.2"  # the header of OpenAI's / Hugging Face's CLIP merges.txt
END_OF_WORD = "</w>"
# open_clip's SimpleTokenizer pattern, after the special tokens (which it puts first, joined by "|").
_PATTERN_TAIL = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# ftfy.fix_text's fixes (ftfy 6.3, default settings) that can change a caption, in ftfy's order, with their tables
# (from ftfy.chardata) where an app can apply them exactly. tests/unit/test_tokenizer_assets.py applies the portable
# ones from tokenizer.json; docs/export.md says why fix_encoding is not.
_FTFY_FIXES = [
    {
        "fix": "fix_encoding",
        "portable": False,
        "what": "mojibake repaired (UTF-8 decoded as Latin-1/Windows-1252: 'Caf\u00c3\u00a9' -> 'Caf\u00e9'), "
        "C1 controls U+0080..U+009F read as Windows-1252; heuristic, not ported",
    },
    {
        "fix": "unescape_html",
        "portable": True,
        "what": "while the text has no '<', decode HTML character references again, until nothing changes (ftfy "
        "repeats its fixes to a fixed point; '&amp;amp;amp;lt;' ends as '<'); not ported: ftfy also decodes "
        "all-caps Latin entities such as '&EACUTE;'",
    },
    {
        "fix": "fix_latin_ligatures",
        "portable": True,
        "map": {
            "0132": "IJ",
            "0133": "ij",
            "0149": "\u02bcn",
            "01F1": "DZ",
            "01F2": "Dz",
            "01F3": "dz",
            "01C4": "D\u017d",
            "01C5": "D\u017e",
            "01C6": "d\u017e",
            "01C7": "LJ",
            "01C8": "Lj",
            "01C9": "lj",
            "01CA": "NJ",
            "01CB": "Nj",
            "01CC": "nj",
            "FB00": "ff",
            "FB01": "fi",
            "FB02": "fl",
            "FB03": "ffi",
            "FB04": "ffl",
            "FB05": "\u017ft",
            "FB06": "st",
        },
    },
    {"fix": "fix_character_width", "portable": True, "nfkc": ["3000", "FF01-FFEE"]},
    {"fix": "uncurl_quotes", "portable": True, "map": {"02BC": "'", "2018-201B": "'", "201C-201F": '"'}},
    {"fix": "fix_line_breaks", "portable": True, "what": "line breaks -> newline: whitespace either way, no effect"},
    {"fix": "remove_terminal_escapes", "portable": True, "remove_pattern": "\x1b\\[((?:\\d|;)*)([a-zA-Z])"},
    {
        "fix": "remove_control_chars",
        "portable": True,
        "remove": ["0000-0008", "000B", "000E-001F", "007F", "206A-206F", "FEFF", "FFF9-FFFC"],
    },
    {"fix": "normalization", "portable": True, "form": "NFC"},
]


def unsupported(tokenizer: Any) -> str | None:
    """Why ``tokenizer`` cannot be written as these files, or None when it can."""
    from open_clip.tokenizer import SimpleTokenizer, get_clean_fn

    if not isinstance(tokenizer, SimpleTokenizer):
        return f"{type(tokenizer).__name__} is not open_clip's SimpleTokenizer (CLIP BPE)"
    if tokenizer.reduction_fn is not None:
        return "a SimpleTokenizer with a reduction_mask (token dropping) is not described by these files"
    if tokenizer.clean_fn is not get_clean_fn("lower"):
        return "only SimpleTokenizer's clean='lower' is described by these files"
    return None


def config(tokenizer: Any) -> dict[str, Any]:
    """The content of ``tokenizer.json`` for an open_clip `SimpleTokenizer` (see the module docstring)."""
    import ftfy
    from open_clip.tokenizer import bytes_to_unicode

    specials = [tokenizer.decoder[i] for i in tokenizer.all_special_ids]
    return {
        "type": "clip-byte-level-bpe",
        "source": "open_clip SimpleTokenizer (OpenAI CLIP BPE, bpe_simple_vocab_16e6)",
        "vocab": VOCAB,
        "merges": MERGES,
        "merges_header_lines": 1,
        "vocab_size": tokenizer.vocab_size,
        "context_length": tokenizer.context_length,
        "start_of_text": {"token": specials[0], "id": tokenizer.sot_token_id},
        "end_of_text": {"token": specials[1], "id": tokenizer.eot_token_id},
        "special_tokens": {t: tokenizer.encoder[t] for t in specials},
        "padding_id": 0,
        "padding_side": "right",
        "truncation": "ids = [start_of_text] + text ids + [end_of_text]; if longer than context_length keep the "
        "first context_length ids and set the last to end_of_text",
        "clean": [
            {
                "step": "ftfy",
                "what": f"ftfy.fix_text (ftfy {ftfy.__version__}, default settings); its fixes that can change a "
                "caption are listed under ftfy_fixes",
            },
            {"step": "html_unescape", "times": 2, "what": "HTML5 character references (Python html.unescape)"},
            {"step": "strip", "what": "leading and trailing Unicode whitespace removed"},
            {"step": "collapse_whitespace", "what": "runs of Unicode whitespace (Python str.split) -> one space"},
            {"step": "lowercase", "what": "Unicode full lower-case mapping (Python str.lower), no locale"},
        ],
        "ftfy_fixes": _FTFY_FIXES,
        "pre_tokenizer": {
            "pattern": "|".join(specials) + "|" + _PATTERN_TAIL,
            "flags": ["IGNORECASE"],
            "syntax": "Python 'regex' package (PCRE-like; \\p{L} Unicode letters, \\p{N} Unicode numbers); "
            "leftmost alternative wins; pieces are all non-overlapping matches, the rest (whitespace) dropped",
        },
        "byte_to_unicode": {str(b): c for b, c in bytes_to_unicode().items()},
        "end_of_word_suffix": END_OF_WORD,
        "special_token_pieces": "a piece equal to a special token maps to its id, without BPE",
    }


def write(tokenizer: Any, folder: Path) -> dict[str, Any]:
    """Writes ``vocab.json``, ``merges.txt`` and ``tokenizer.json`` of ``tokenizer`` into ``folder``.

    Returns:
        The content of ``tokenizer.json``.

    Raises:
        ValueError: The tokenizer is not one these files describe (`unsupported`).
    """
    reason = unsupported(tokenizer)
    if reason:
        raise ValueError(reason)
    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.__getitem__)
    assert [tokenizer.bpe_ranks[m] for m in merges] == list(range(len(merges))), "merge ranks must be 0..n-1"
    settings = config(tokenizer)
    (folder / VOCAB).write_text(json.dumps(tokenizer.encoder, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = [MERGES_HEADER] + [f"{left} {right}" for left, right in merges]
    (folder / MERGES).write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / CONFIG).write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return settings
