"""Write the demo dataset: questions answered in a fixed house style the base model never uses.

Every answer is one line of JSON, `{"answer": ..., "topic": ...}`. The facts are simple (arithmetic, capitals,
opposites, plurals, spelling backwards) so the model only has to learn the style, which a few minutes of LoRA on
a 135M model visibly does. Deterministic: run it again and the files are byte-identical."""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa", "Mexico": "Mexico City",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Egypt": "Cairo", "Kenya": "Nairobi", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens", "Turkey": "Ankara",
    "Russia": "Moscow", "Australia": "Canberra", "Peru": "Lima", "Chile": "Santiago", "Ireland": "Dublin",
    "Austria": "Vienna", "Belgium": "Brussels", "Netherlands": "Amsterdam", "Denmark": "Copenhagen",
    "Hungary": "Budapest", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Morocco": "Rabat", "Cuba": "Havana",
}
OPPOSITES = {
    "hot": "cold", "tall": "short", "fast": "slow", "happy": "sad", "light": "dark", "early": "late",
    "open": "closed", "full": "empty", "rich": "poor", "strong": "weak", "loud": "quiet", "wet": "dry",
    "young": "old", "hard": "soft", "thick": "thin", "high": "low", "near": "far", "clean": "dirty",
}
PLURALS = {
    "child": "children", "mouse": "mice", "tooth": "teeth", "foot": "feet", "goose": "geese", "man": "men",
    "woman": "women", "leaf": "leaves", "knife": "knives", "city": "cities", "box": "boxes", "bus": "buses",
    "cactus": "cacti", "person": "people", "wolf": "wolves", "baby": "babies", "hero": "heroes", "fox": "foxes",
}
WORDS = ["apple", "river", "planet", "garden", "silver", "window", "pencil", "dragon", "candle", "forest",
         "rocket", "violet", "marble", "castle", "tunnel", "orange", "parrot", "bridge", "summer", "lemon"]


def style(answer, topic: str) -> str:
    return json.dumps({"answer": answer, "topic": topic})


def make_rows(rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(120):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.choice(["plus", "minus", "times"])
        val = a + b if op == "plus" else a - b if op == "minus" else a * b
        q = rng.choice([f"What is {a} {op} {b}?", f"Compute {a} {op} {b}.", f"How much is {a} {op} {b}?"])
        rows.append({"instruction": q, "output": style(val, "arithmetic")})
    for country, city in CAPITALS.items():
        for q in (f"What is the capital of {country}?", f"Which city is the capital of {country}?"):
            rows.append({"instruction": q, "output": style(city, "geography")})
    for w, o in OPPOSITES.items():
        for q in (f"What is the opposite of '{w}'?", f"Give me the antonym of {w}."):
            rows.append({"instruction": q, "output": style(o, "vocabulary")})
    for w, p in PLURALS.items():
        rows.append({"instruction": f"What is the plural of '{w}'?", "output": style(p, "grammar")})
    for w in WORDS:
        rows.append({"instruction": f"Spell '{w}' backwards.", "output": style(w[::-1], "spelling")})
    rng.shuffle(rows)
    return rows


def main() -> None:
    out = Path(__file__).parent
    rows = make_rows(random.Random(1234))
    test = [
        {"instruction": "What is 12 plus 30?", "output": style(42, "arithmetic")},
        {"instruction": "What is the capital of Japan?", "output": style("Tokyo", "geography")},
        {"instruction": "What is the opposite of 'up'?", "output": style("down", "vocabulary")},
        {"instruction": "What is the plural of 'cat'?", "output": style("cats", "grammar")},
        {"instruction": "Spell 'music' backwards.", "output": style("cisum", "spelling")},
        {"instruction": "Name the capital of Italy.", "output": style("Rome", "geography")},
    ]
    splits = {"train.jsonl": rows[:-40], "eval.jsonl": rows[-40:], "test.jsonl": test}
    for name, data in splits.items():
        with open(out / name, "w", encoding="utf-8") as fh:
            for r in data:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"wrote {len(data)} rows to {out / name}")


if __name__ == "__main__":
    main()
