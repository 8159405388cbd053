"""Answer normalisation of the VQA/EvalAI evaluator (the "m4c" processor Bunny and lmms-eval use) and VQA accuracy.

Steps, in order: lowercase; drop "," and "?"; split off "'s"; whitespace to spaces; punctuation either deleted
(next to a space, or in a number like 1,000) or turned into a space; periods dropped unless a digit follows;
number words to digits; articles dropped; contractions restored (dont -> don't).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!"]
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
_CONTRACTED = ["ain't", "aren't", "can't", "could've", "couldn't", "didn't", "doesn't", "don't", "hadn't", "hasn't",
               "haven't", "he'd", "he'll", "he's", "how'd", "how'll", "how's", "i'd", "i'll", "i'm", "i've", "isn't",
               "it'd", "it'll", "let's", "ma'am", "mightn't", "might've", "mustn't", "must've", "needn't",
               "o'clock", "shan't", "she'd", "she'll", "she's", "should've", "shouldn't", "that's", "there'd",
               "there're", "there's", "they'd", "they'll", "they're", "they've", "wasn't", "we'd", "we'll", "we're",
               "we've", "weren't", "what'll", "what're", "what's", "what've", "when's", "where'd", "where's",
               "where've", "who'd", "who'll", "who's", "who've", "why'll", "why're", "why's", "won't", "would've",
               "wouldn't", "y'all", "you'd", "you'll", "you're", "you've"]
CONTRACTIONS = {c.replace("'", ""): c for c in _CONTRACTED}
_THOUSANDS = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")


def normalize_vqa(answer: str) -> str:
    s = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    s = " ".join(s.replace("\n", " ").replace("\t", " ").split())
    before = s  # every punctuation decision looks at the text as it was before this pass
    for p in PUNCTUATION:
        if f"{p} " in before or f" {p}" in before or _THOUSANDS.search(before) is not None:
            s = s.replace(p, "")
        else:
            s = s.replace(p, " ")
    s = _PERIOD.sub("", s)
    words = []
    for w in s.split():
        w = NUMBERS.get(w, w)
        if w in ARTICLES:
            continue
        words.append(CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """VQA soft accuracy: for each reference, min(1, matches among the other references / 3), averaged."""
    if not references:
        raise ValueError("VQA accuracy needs reference answers")
    pred = normalize_vqa(prediction)
    refs = [normalize_vqa(r) for r in references]
    scores = []
    for i in range(len(refs)):
        others = refs[:i] + refs[i + 1:]
        scores.append(min(1.0, sum(r == pred for r in others) / 3))
    return sum(scores) / len(scores)


def normalize_gqa(answer: str) -> str:
    """GQA's rule: strip a final "." and lowercase, nothing else ("a dog" stays wrong for "dog")."""
    s = answer.strip()
    if s.endswith("."):
        s = s[:-1]
    return s.lower().strip()


def normalize_exact_match(answer: str) -> str:
    """lmms-eval's `exact_match` (ignore_case, ignore_punctuation): lowercase and delete every punctuation character;
    no article or number rules."""
    return answer.strip().lower().translate(str.maketrans("", "", string.punctuation)).strip()
