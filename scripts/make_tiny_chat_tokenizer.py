"""Build `assistant/assets/tiny_chat_tokenizer.json`, the byte-level BPE tokenizer of the tiny random Phi model.

Phi-2's own tokenizer (GPT-2/CodeGen BPE, 50295 entries) needs a download; tiny mode and the tests need a tokenizer
that behaves the same way: byte-level BPE (every string round-trips), no BOS, and `<|endoftext|>` as the one
special token that is BOS, EOS, UNK and pad at once. We train one on the chat template and region-line text.
Run: python scripts/make_tiny_chat_tokenizer.py
"""

import itertools
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

COLOURS = ["red", "green", "blue", "yellow", "white", "black", "brown", "grey", "orange", "purple"]
THINGS = ["dog", "cat", "car", "tree", "house", "person", "sky", "grass", "road", "boat", "circle", "square",
          "triangle", "bird", "table", "window", "flower", "water"]
QUESTIONS = ["What is in the image?", "What colour is <region1>?", "How many objects are there?",
             "Where is the dog?", "Describe <region2> in detail.", "Is there a cat on the left?",
             "Answer the question using a single word or phrase."]
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
VOCAB_SIZE = 1024


def corpus() -> list[str]:
    lines = [SYSTEM, *QUESTIONS]
    lines += [f"USER: {q} ASSISTANT: a {c} {t}." for q, c, t in itertools.product(QUESTIONS, COLOURS, THINGS)]
    lines += [f'<region{n}>: {t} (0.{n}1), box [1{n}2,340,498,8{n}0] on a 0-999 grid, {n}4% of image, "a {c} {t}"'
              for n, c, t in itertools.product(range(1, 10), COLOURS, THINGS)]
    return lines


def main() -> None:
    out = Path(__file__).resolve().parents[1] / "assistant" / "assets" / "tiny_chat_tokenizer.json"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    tok.save(str(out))
    print(f"wrote {out} ({tok.get_vocab_size()} entries)")


if __name__ == "__main__":
    main()
