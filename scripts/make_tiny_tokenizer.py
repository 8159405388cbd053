"""Build `tokenizer_tap/assets/tiny_tokenizer.model`, the small SentencePiece model of the random-weight demo.

The real caption tokenizer (LLaMA's, 32000 pieces) cannot ship with the project; tiny mode needs some tokenizer
with the same special ids (unk 0, BOS 1, EOS 2, byte fallback), so we train one on generated captions.
Run: python scripts/make_tiny_tokenizer.py
"""

import io
import itertools
from pathlib import Path

import sentencepiece as spm

COLOURS = ["red", "green", "blue", "yellow", "white", "black", "brown", "grey", "orange", "purple"]
THINGS = ["dog", "cat", "car", "tree", "house", "person", "woman", "man", "sky", "cloud", "sun", "road", "boat",
          "bird", "horse", "chair", "table", "window", "door", "flower", "grass", "water", "mountain", "roof"]
PLACES = ["on the grass", "in the sky", "near the road", "by the water", "in front of a house", "on a table",
          "under a tree", "at the top left", "at the bottom right", "in the middle"]


def corpus() -> str:
    lines = [f"a {c} {t} {p}" for c, t, p in itertools.product(COLOURS, THINGS, PLACES)]
    lines += [f"the {t} is {c}" for t, c in itertools.product(THINGS, COLOURS)]
    return "\n".join(lines)


def main() -> None:
    out = Path(__file__).resolve().parents[1] / "tokenizer_tap" / "assets" / "tiny_tokenizer.model"
    model = io.BytesIO()
    spm.SentencePieceTrainer.Train(sentence_iterator=iter(corpus().splitlines()), model_writer=model,
                                   vocab_size=384, model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
                                   normalization_rule_name="identity")
    out.write_bytes(model.getvalue())
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
