"""Tokenizer assets: a tokenizer re-implemented from vocab.json, merges.txt and tokenizer.json equals open_clip's.

The re-implementation (`FileTokenizer`) reads only the three files and uses the standard library plus ``regex``
(installed with open_clip; an app needs a regex engine with Unicode ``\\p{L}`` / ``\\p{N}`` classes). It does not
use ftfy: an app has no ftfy, so it applies ftfy's fixes as ``tokenizer.json`` lists them (tables included), all
but mojibake repair (``fix_encoding``), which is a heuristic; one string below shows the difference it makes.
"""

from __future__ import annotations

import gzip
import html
import itertools
import json
import unicodedata
from pathlib import Path

import pytest
import regex

from clipdr import models, tokenizer_assets

NAME = "clipdr-tiny-vit"

STRINGS = [
    "",
    "a photo of a dog",
    "A PHOTO of a Dog!!",
    "   extra    whitespace\t\tand\nnewlines  ",
    "punctuation: (hello), [world]; {x} -- 'quoted' \"double\"... ?!",
    "it's they're we've I'm you'll he'd isn't",
    "numbers 12345 and 3.14159 and 1,000,000",
    "Café crème brûlée, naïve façade, Ångström, straße, ΣΊΣΥΦΟΣ",
    "東京タワーの写真 and 北京",
    "emoji 🐶🐱 and 👨‍👩‍👧 family 🇫🇷",
    "html &amp; entities &lt;b&gt;bold&lt;/b&gt; &quot;q&quot; &#39;s &amp;amp; &eacute;",
    "<b>tags stay</b> &nbsp;non-breaking &amp;lt;twice&amp;gt;",  # has "<": ftfy leaves entities to html_unescape
    "“curly” ‘quotes’ and ﬁne ﬂowers",  # ftfy: uncurl_quotes, fix_latin_ligatures
    "ＦＵＬＬ　ｗｉｄｔｈ　１２３",  # ftfy: fix_character_width
    "cafe\u0301 combining accent",  # ftfy: NFC
    "bell\x07 and\x00nul \x1b[31mred\x1b[0m",  # ftfy: remove_control_chars, remove_terminal_escapes
    "&amp;amp;amp;lt;triple escaped&amp;amp;amp;gt;",  # ftfy: unescape_html to a fixed point
    "special <start_of_text> and <END_OF_TEXT> inside",
    "word " * 100,  # longer than the context: truncated, end-of-text last
    "supercalifragilisticexpialidocious" * 8,
]
MOJIBAKE = "CafÃ© au lait"  # ftfy.fix_encoding makes this "Café"; FileTokenizer does not repair mojibake


def _code_points(spec: str) -> range:
    """``"FB00"`` or ``"FB00-FB06"`` (hex, inclusive) as code points."""
    first, _, last = spec.partition("-")
    return range(int(first, 16), int(last or first, 16) + 1)


class FileTokenizer:
    """CLIP's BPE tokenizer from an export's tokenizer files alone (no open_clip, no ftfy)."""

    def __init__(self, folder: Path) -> None:
        cfg = json.loads((folder / tokenizer_assets.CONFIG).read_text(encoding="utf-8"))
        self.vocab = json.loads((folder / cfg["vocab"]).read_text(encoding="utf-8"))
        lines = (folder / cfg["merges"]).read_text(encoding="utf-8").split("\n")[cfg["merges_header_lines"] :]
        self.ranks = {tuple(line.split(" ")): rank for rank, line in enumerate(line for line in lines if line)}
        self.context_length = cfg["context_length"]
        self.sot, self.eot = cfg["start_of_text"]["id"], cfg["end_of_text"]["id"]
        self.padding_id = cfg["padding_id"]
        self.specials = cfg["special_tokens"]
        self.suffix = cfg["end_of_word_suffix"]
        self.byte_to_unicode = {int(b): c for b, c in cfg["byte_to_unicode"].items()}
        pre = cfg["pre_tokenizer"]
        assert pre["flags"] == ["IGNORECASE"]
        self.pattern = regex.compile(pre["pattern"], regex.IGNORECASE)
        self.ftfy_fixes = cfg["ftfy_fixes"]
        assert [s["step"] for s in cfg["clean"]] == [
            "ftfy",
            "html_unescape",
            "strip",
            "collapse_whitespace",
            "lowercase",
        ]

    def ftfy_portable(self, text: str) -> str:
        """ftfy's fixes as tokenizer.json lists them, the portable ones only, to a fixed point (as ftfy)."""
        while True:
            fixed = text
            for fix in self.ftfy_fixes:
                if not fix["portable"]:
                    continue
                if fix["fix"] == "unescape_html" and "<" not in fixed:
                    fixed = html.unescape(fixed)
                if "map" in fix:
                    fixed = fixed.translate({c: v for k, v in fix["map"].items() for c in _code_points(k)})
                if "nfkc" in fix:
                    nfkc = {c for k in fix["nfkc"] for c in _code_points(k)}
                    fixed = "".join(unicodedata.normalize("NFKC", c) if ord(c) in nfkc else c for c in fixed)
                if "remove_pattern" in fix:
                    fixed = regex.sub(fix["remove_pattern"], "", fixed)
                if "remove" in fix:
                    fixed = fixed.translate(dict.fromkeys(c for k in fix["remove"] for c in _code_points(k)))
                if "form" in fix:
                    fixed = unicodedata.normalize(fix["form"], fixed)
            if fixed == text:
                return text
            text = fixed

    def clean(self, text: str) -> str:
        text = html.unescape(html.unescape(self.ftfy_portable(text))).strip()
        return " ".join(text.split()).lower()

    def bpe(self, piece: str) -> list[str]:
        word = [*piece[:-1], piece[-1] + self.suffix]
        while len(word) > 1:
            pairs = [(self.ranks.get(pair, float("inf")), i) for i, pair in enumerate(itertools.pairwise(word))]
            rank, first = min(pairs)  # the lowest-ranked pair; all its occurrences merge
            if rank == float("inf"):
                break
            left, right = word[first], word[first + 1]
            merged, i = [], 0
            while i < len(word):  # merge every occurrence of the pair, left to right
                if i < len(word) - 1 and word[i] == left and word[i + 1] == right:
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.pattern.findall(self.clean(text)):
            if piece in self.specials:
                ids.append(self.specials[piece])
                continue
            symbols = "".join(self.byte_to_unicode[b] for b in piece.encode("utf-8"))
            ids.extend(self.vocab[s] for s in self.bpe(symbols))
        return ids

    def __call__(self, text: str) -> list[int]:
        ids = [self.sot, *self.encode(text), self.eot]
        if len(ids) > self.context_length:
            ids = ids[: self.context_length]
            ids[-1] = self.eot
        return ids + [self.padding_id] * (self.context_length - len(ids))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer = models.get_tokenizer(NAME)
    return folder, tokenizer_assets.write(tokenizer, folder), tokenizer


def test_files_reimplemented_without_open_clip_equal_open_clips_tokenizer(files):
    folder, _, tokenizer = files
    expected = tokenizer(STRINGS).tolist()
    ours = FileTokenizer(folder)
    assert [ours(s) for s in STRINGS] == expected
    truncated = expected[STRINGS.index("word " * 100)]
    assert truncated[-1] == ours.eot and ours.padding_id not in truncated  # the over-long text filled the context
    assert expected[0][:3] == [ours.sot, ours.eot, ours.padding_id]  # the empty string: start, end, padding


def test_mojibake_repair_is_the_ftfy_fix_a_file_tokenizer_lacks(files):
    folder, cfg, tokenizer = files
    assert [fix["fix"] for fix in cfg["ftfy_fixes"] if not fix["portable"]] == ["fix_encoding"]
    ours = FileTokenizer(folder)
    assert ours(MOJIBAKE) != tokenizer(MOJIBAKE)[0].tolist()
    assert ours("Café au lait") == tokenizer(MOJIBAKE)[0].tolist()


def test_config_records_the_tokenizers_settings(files):
    _, cfg, tokenizer = files
    assert cfg["context_length"] == tokenizer.context_length == models.model_config(NAME)["text_cfg"]["context_length"]
    assert (cfg["start_of_text"]["id"], cfg["end_of_text"]["id"]) == (tokenizer.sot_token_id, tokenizer.eot_token_id)
    assert cfg["vocab_size"] == len(tokenizer.encoder) == 49408


def test_merges_are_clips_and_other_tokenizers_are_refused(files):
    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    folder, _, tokenizer = files
    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        clip_merges = f.read().split("\n")[1 : len(tokenizer.bpe_ranks) + 1]
    lines = (folder / tokenizer_assets.MERGES).read_text(encoding="utf-8").splitlines()
    assert lines == [tokenizer_assets.MERGES_HEADER, *clip_merges]
    assert tokenizer_assets.unsupported(tokenizer) is None
    other = SimpleTokenizer(clean="whitespace")  # keeps case: these files would describe it wrongly
    with pytest.raises(ValueError, match="clean='lower'"):
        tokenizer_assets.write(other, folder)
