"""Writes the bundled quickstart data: data/alpaca_tiny.json and data/conversations_tiny.json.

Every record is written here, by hand or from the small hand-written tables below (no text from existing
datasets). The answers repeat a few fixed sentence patterns on purpose: a 64-wide, 2-layer model trained for a
minute can learn them, so the quickstart chat says something recognisable.

    python data/make_tiny_data.py     # rewrites both files (deterministic)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OPPOSITES = [
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("up", "down"),
    ("day", "night"),
    ("happy", "sad"),
    ("light", "dark"),
    ("open", "closed"),
    ("old", "new"),
    ("full", "empty"),
    ("wet", "dry"),
    ("early", "late"),
    ("high", "low"),
    ("loud", "quiet"),
    ("hard", "soft"),
    ("long", "short"),
    ("rich", "poor"),
    ("young", "old"),
    ("left", "right"),
    ("in", "out"),
    ("strong", "weak"),
    ("clean", "dirty"),
    ("thick", "thin"),
    ("near", "far"),
]

COLORS = [
    ("the sky on a clear day", "blue"),
    ("grass", "green"),
    ("snow", "white"),
    ("a ripe banana", "yellow"),
    ("a ripe tomato", "red"),
    ("coal", "black"),
    ("an orange", "orange"),
    ("a lemon", "yellow"),
    ("a strawberry", "red"),
    ("milk", "white"),
    ("a fresh leaf", "green"),
    ("chocolate", "brown"),
    ("the sun in a drawing", "yellow"),
    ("a crow", "black"),
    ("a carrot", "orange"),
    ("the sea in a picture", "blue"),
]

SOUNDS = [
    ("cow", "moo"),
    ("dog", "woof"),
    ("cat", "meow"),
    ("duck", "quack"),
    ("sheep", "baa"),
    ("owl", "hoot"),
    ("lion", "roar"),
    ("bee", "buzz"),
    ("snake", "hiss"),
    ("horse", "neigh"),
    ("pig", "oink"),
    ("frog", "croak"),
]

CAPITALS = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Germany", "Berlin"),
    ("Egypt", "Cairo"),
    ("Canada", "Ottawa"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Norway", "Oslo"),
    ("Greece", "Athens"),
    ("Ireland", "Dublin"),
    ("Portugal", "Lisbon"),
    ("Austria", "Vienna"),
    ("Poland", "Warsaw"),
    ("Chile", "Santiago"),
]

WORDS = [
    "apple",
    "river",
    "garden",
    "music",
    "window",
    "pencil",
    "cloud",
    "tiger",
    "bread",
    "planet",
    "candle",
    "bridge",
    "forest",
    "rocket",
    "castle",
    "lemon",
]

HANDWRITTEN = [
    ("Say hello.", "", "Hello! How can I help you today?"),
    ("Greet a new friend.", "", "Hello, friend! It is nice to meet you."),
    ("Who are you?", "", "I am a tiny language model trained for this quickstart."),
    ("What can you do?", "", "I can answer short questions about colors, opposites, animals and numbers."),
    ("Give a tip for staying healthy.", "", "Drink water, sleep well and take a walk every day."),
    ("Name a fruit.", "", "An apple is a fruit."),
    ("Name an animal that can fly.", "", "A bird can fly."),
    ("Name an animal that lives in the sea.", "", "A fish lives in the sea."),
    ("How many days are in a week?", "", "There are seven days in a week."),
    ("How many legs does a spider have?", "", "A spider has eight legs."),
    ("How many legs does a dog have?", "", "A dog has four legs."),
    ("What do bees make?", "", "Bees make honey."),
    ("What do we use to write?", "", "We use a pen or a pencil to write."),
    ("Where do fish live?", "", "Fish live in water."),
    ("What falls from clouds?", "", "Rain falls from clouds."),
    ("What do plants need to grow?", "", "Plants need water, light and soil to grow."),
    ("Say goodbye.", "", "Goodbye! Have a nice day."),
    ("Thank the user.", "", "Thank you! I am glad I could help."),
    ("Describe the weather on a sunny day.", "", "On a sunny day the sky is blue and the air is warm."),
    ("Finish the sentence.", "The cat sat on the", "The cat sat on the mat."),
    ("Finish the sentence.", "Birds can", "Birds can fly."),
    ("Finish the sentence.", "In winter it is", "In winter it is cold."),
    ("Is the sun hot or cold?", "", "The sun is hot."),
    ("Is ice hot or cold?", "", "Ice is cold."),
]

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def alpaca_records() -> list[dict[str, str]]:
    rng = random.Random(7)
    records: list[dict[str, str]] = []

    def add(instruction: str, output: str, input: str = "") -> None:
        records.append({"instruction": instruction, "input": input, "output": output})

    for a, b in OPPOSITES:
        add(f"What is the opposite of {a}?", f"The opposite of {a} is {b}.")
        add("Give the opposite of the word.", f"The opposite of {b} is {a}.", input=b)
    for thing, color in COLORS:
        add(f"What color is {thing}?", f"{thing[0].upper()}{thing[1:]} is {color}.")
    for animal, sound in SOUNDS:
        add(f"What sound does a {animal} make?", f"A {animal} says {sound}.")
    for country, capital in CAPITALS:
        add(f"What is the capital of {country}?", f"The capital of {country} is {capital}.")
    for word in WORDS:
        add("Write the word in capital letters.", word.upper(), input=word)
        add("How many letters are in the word?", f"The word {word} has {len(word)} letters.", input=word)
    pairs = [(a, b) for a in range(1, 6) for b in range(1, 6)]
    for a, b in rng.sample(pairs, 20):
        add(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.")
    for n in range(1, 10):
        add("Write the number as a word.", f"{n} is {NUMBER_WORDS[n]}.", input=str(n))
    for instruction, input, output in HANDWRITTEN:
        add(instruction, output, input=input)
    return records


def conversations() -> list[dict]:
    """Every question without an input as a one-turn chat (the chat demo's template), plus multi-turn chats."""
    rng = random.Random(11)
    openers = [("Hi!", "Hello! How can I help you today?"), ("Hello there.", "Hello! What would you like to know?")]
    questions = (
        [(f"What is the opposite of {a}?", f"The opposite of {a} is {b}.") for a, b in OPPOSITES]
        + [(f"What sound does a {a} make?", f"A {a} says {s}.") for a, s in SOUNDS]
        + [(f"What is the capital of {c}?", f"The capital of {c} is {p}.") for c, p in CAPITALS]
    )
    singles = [(r["instruction"], r["output"]) for r in alpaca_records() if not r["input"]]
    out = [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in singles]
    for i in range(40):
        turns = [openers[i % 2]] + rng.sample(questions, 2)
        if i % 4 == 3:
            turns.append(("Thank you!", "You are welcome!"))
        convo = []
        for human, gpt in turns:
            convo += [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
        out.append({"conversations": convo})
    return out


def main() -> None:
    here = Path(__file__).resolve().parent
    for name, records in [("alpaca_tiny.json", alpaca_records()), ("conversations_tiny.json", conversations())]:
        (here / name).write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {len(records)} records to {here / name}")


if __name__ == "__main__":
    main()
