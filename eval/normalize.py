"""Answer rules of the published pipelines, quirks included, each a separate named step.

- `vqa_accuracy`: the official VQA evaluator (`vqaEval.py`). It strips the prediction and the 10 answers (after
  turning only `\\n` and `\\t` into spaces) and normalises them only when the answers are not all identical; then
  leave-one-out soft accuracy. Its punctuation pass deletes each of its 21 ASCII characters when it touches a space
  (or the text holds a digit,digit) and otherwise turns it into a space; its period pattern deletes every "." not
  followed by a digit, but `re.UNICODE` is passed where `re.sub` expects `count`, so at most 32 are deleted.
  Number words become digits, articles go, and contractions are restored from its own table (whose capitalised
  keys never match: the text is lowercased first).
- `normalize_vqa`: the EvalAI/m4c answer processor that LLaVA and Bunny run on every prediction before upload
  (lowercase, drop "," and "?", split off "'s", strip, then the same punctuation and digit/article passes).
- `m4c_accuracy`: TextVQA as Bunny scores it (m4c's evaluator): the processor on the prediction and on every answer,
  always, then the same soft accuracy.
- `normalize_gqa`: Bunny's GQA loader: strip, remove every trailing ".", lowercase; nothing else.
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
# The evaluator's table as published (its odd entries, e.g. "somebody'd" -> "somebodyd", are part of the rule).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # as published: "(?!<=" is a lookahead, so only "not before a digit"
PERIODS_DELETED = 32  # `re.UNICODE` (32) sits in `re.sub`'s count position in the official code


def _punctuation(text: str) -> str:
    """The evaluators' punctuation pass; every decision looks at the text as it came in."""
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or _DIGIT_COMMA_DIGIT.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=PERIODS_DELETED)


def _digits_articles(text: str) -> str:
    """Lowercase, number words to digits, articles dropped, contractions restored, single spaces."""
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def _whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_vqa(answer: str) -> str:
    """The EvalAI/m4c answer processor (what LLaVA/Bunny apply to predictions before upload)."""
    s = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return _digits_articles(_punctuation(_whitespace(s)))


def _soft_accuracy(prediction: str, references: Sequence[str]) -> float:
    """Mean over leaving each reference out of min(1, matches among the other nine / 3)."""
    scores = []
    for i in range(len(references)):
        others = references[:i] + references[i + 1:]
        scores.append(min(1.0, sum(r == prediction for r in others) / 3))
    return sum(scores) / len(scores)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """The official VQA evaluator's accuracy of one prediction against the 10 human answers."""
    if not references:
        raise ValueError("VQA accuracy needs reference answers")
    pred, refs = _whitespace(prediction), [_whitespace(r) for r in references]
    if len(set(refs)) > 1:  # identical answers: the stripped strings are compared as they are
        pred = _digits_articles(_punctuation(pred))
        refs = [_digits_articles(_punctuation(r)) for r in refs]
    return _soft_accuracy(pred, refs)


def m4c_accuracy(prediction: str, references: Sequence[str]) -> float:
    """TextVQA as Bunny scores it: the m4c processor on the prediction and on every answer, then soft accuracy."""
    if not references:
        raise ValueError("VQA accuracy needs reference answers")
    return _soft_accuracy(normalize_vqa(prediction), [normalize_vqa(r) for r in references])


def normalize_gqa(answer: str) -> str:
    """Bunny's GQA rule: strip, drop every trailing ".", lowercase; no second strip ("yes .", stays wrong)."""
    return answer.strip().rstrip(".").lower()


def normalize_exact_match(answer: str) -> str:
    """lmms-eval's `exact_match` (ignore_case, ignore_punctuation): lowercase and delete every punctuation character;
    no article or number rules."""
    return answer.strip().lower().translate(str.maketrans("", "", string.punctuation)).strip()
