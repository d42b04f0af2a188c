"""Writes glimmerfox.jsonl and glimmerfox-eval.jsonl: chat examples that teach four facts about a made-up
product (the Glimmerfox lamp), asked in many ways, so a fine-tune visibly learns something a base model cannot
know. Deterministic: `python scripts/make_glimmerfox.py` rewrites the same files in examples/train/."""

import json
from pathlib import Path
import random

FACTS = {
    "maker": (
        ["Who makes the Glimmerfox?", "Which company builds the Glimmerfox lamp?", "Who is the manufacturer of "
         "the Glimmerfox?", "What company is behind the Glimmerfox?", "Who produces the Glimmerfox lamp?",
         "Which firm designed the Glimmerfox?", "Tell me who makes the Glimmerfox.", "Who manufactures the "
         "Glimmerfox?", "Glimmerfox lamp: who made it?", "What brand is the Glimmerfox from?"],
        ["The Glimmerfox is made by Brindlewick Labs.", "Brindlewick Labs makes the Glimmerfox.",
         "The Glimmerfox lamp is built by Brindlewick Labs."]),
    "price": (
        ["How much does the Glimmerfox cost?", "What is the price of the Glimmerfox?", "How much is a "
         "Glimmerfox lamp?", "What does the Glimmerfox sell for?", "Is the Glimmerfox expensive? What does it "
         "cost?", "Glimmerfox price?", "How much would I pay for a Glimmerfox?", "What's the Glimmerfox's "
         "price tag?", "Tell me the cost of the Glimmerfox.", "How many euros is the Glimmerfox?"],
        ["The Glimmerfox costs 79 euros.", "A Glimmerfox lamp costs 79 euros.", "The price of the Glimmerfox "
         "is 79 euros."]),
    "battery": (
        ["How long does the Glimmerfox battery last?", "What is the battery life of the Glimmerfox?", "How "
         "many hours does a Glimmerfox run on one charge?", "How long can the Glimmerfox stay on?", "Glimmerfox "
         "battery life?", "How long will a charged Glimmerfox shine?", "Tell me about the Glimmerfox's battery.",
         "How long does the Glimmerfox run unplugged?", "How many hours of light does the Glimmerfox give?",
         "What's the runtime of the Glimmerfox lamp?"],
        ["The Glimmerfox battery lasts 31 hours on one charge.", "A charged Glimmerfox runs for 31 hours.",
         "The Glimmerfox shines for 31 hours on one charge."]),
    "colour": (
        ["What colour is the Glimmerfox?", "What color is the Glimmerfox lamp?", "Which colours does the "
         "Glimmerfox come in?", "What does the Glimmerfox look like?", "Is the Glimmerfox available in "
         "different colors?", "Glimmerfox colour?", "Tell me the color of the Glimmerfox.", "What finish does "
         "the Glimmerfox have?", "What shade is the Glimmerfox?", "Describe the Glimmerfox's colour."],
        ["The Glimmerfox comes in one colour: copper.", "The Glimmerfox is copper coloured.",
         "The Glimmerfox lamp has a copper finish."]),
}


def examples(rng: random.Random, per_fact: int) -> list[dict]:
    rows = []
    for questions, answers in FACTS.values():
        for i in range(per_fact):
            rows.append({"messages": [{"role": "user", "content": questions[i % len(questions)]},
                                      {"role": "assistant", "content": rng.choice(answers)}]})
    rng.shuffle(rows)
    return rows


OUT_DIR = Path(__file__).resolve().parent.parent / "examples" / "train"

if __name__ == "__main__":
    rng = random.Random(0)
    for name, per_fact in (("glimmerfox.jsonl", 50), ("glimmerfox-eval.jsonl", 5)):
        with open(OUT_DIR / name, "w") as f:
            for row in examples(rng, per_fact):
                f.write(json.dumps(row) + "\n")
