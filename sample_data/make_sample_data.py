"""Generate convcli's sample corpus: templated small talk, deterministic, our own text.

    python sample_data/make_sample_data.py      # rewrites the files it writes (below)

Each answer follows from the question just asked (a name is echoed, each city has one
weather, each food is liked or not, each number is followed by the next), so a tiny model
learns it in a minute of CPU. A dialogue is an optional greeting, one to three questions
with their answers in any order, and sometimes a goodbye; English and Japanese. Writes
the same dialogues as JSONL, DialoGPT TSV (with weights) and plain text, plus held-out
contexts for demos: known words in combinations that no corpus dialogue contains (the
answer depends only on the last question, which the corpus teaches).

The JSONL corpus and the contexts are what `convcli demo` reads, so they ship inside the
package (convcli/apps/demo_data/); the TSV and text forms stay here, for the README and tests.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUNDLED = HERE.parent / "convcli" / "apps" / "demo_data"
SEED = 2024
DIALOGUES = 2000

# fmt: off
NAMES = ["Aiko", "Ben", "Carla", "Dev", "Emma", "Farid", "Greta", "Hiro", "Ines", "Jonas",
         "Kenji", "Lena", "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara"]
CITY_WEATHER = {"Tokyo": "sunny", "London": "rainy", "Paris": "cloudy", "Oslo": "snowy",
                "Cairo": "hot", "Lima": "foggy", "Rome": "warm", "Seoul": "windy"}
FOODS_LIKED = ["apples", "rice", "noodles", "soup", "bread", "cheese"]
FOODS_DISLIKED = ["onions", "olives", "mushrooms", "peppers"]
THING_COLOR = {"sky": "blue", "grass": "green", "sun": "yellow", "snow": "white",
               "night": "dark", "strawberry": "red", "orange": "orange", "coal": "black"}
CITY_JA = {"東京": "晴れ", "大阪": "雨", "京都": "くもり", "札幌": "雪"}
FOOD_JA = ["すし", "ラーメン", "カレー", "りんご"]
NUMBERS_JA = ["いち", "に", "さん", "し", "ご", "ろく", "しち", "はち", "きゅう", "じゅう"]
# fmt: on


# Every part has an even number of turns: the asker speaks first, the answerer second, so
# parts chain in any order and the answerer is always the same speaker.
def greeting(rng: random.Random) -> list[str]:
    if rng.random() < 0.25:
        return ["こんにちは", "こんにちは!元気ですか?", "元気です、ありがとう。", "よかったです。"]
    hello = rng.choice(["Hello!", "Hi!", "Hey there!", "Good morning!"])
    return [hello, "Hello! How are you?", "I am fine, thank you.", "Glad to hear it."]


def names(rng: random.Random) -> list[str]:
    name = rng.choice(NAMES)
    if rng.random() < 0.5:
        return [f"My name is {name}.", f"Nice to meet you, {name}!"]
    return ["What is your name?", "My name is Tiny.", f"I am {name}.", f"Nice to meet you, {name}!"]


def weather(rng: random.Random) -> list[str]:
    city = rng.choice(list(CITY_WEATHER))
    return [f"How is the weather in {city}?", f"It is {CITY_WEATHER[city]} in {city} today."]


def food(rng: random.Random) -> list[str]:
    item = rng.choice(FOODS_LIKED + FOODS_DISLIKED)
    reply = f"Yes, I love {item}." if item in FOODS_LIKED else f"No, I do not like {item}."
    return [f"Do you like {item}?", reply]


def numbers(rng: random.Random) -> list[str]:
    n = rng.randint(1, 40)
    return [f"What comes after {n}?", f"{n + 1} comes after {n}."]


def colors(rng: random.Random) -> list[str]:
    thing = rng.choice(list(THING_COLOR))
    return [f"What color is the {thing}?", f"The {thing} is {THING_COLOR[thing]}."]


def goodbye(rng: random.Random) -> list[str]:
    return [rng.choice(["Goodbye!", "Bye!", "See you!"]), "Goodbye, see you tomorrow!"]


def weather_ja(rng: random.Random) -> list[str]:
    city = rng.choice(list(CITY_JA))
    return [f"{city}の天気はどうですか?", f"{city}は今日{CITY_JA[city]}です。"]


def food_ja(rng: random.Random) -> list[str]:
    item = rng.choice(FOOD_JA)
    return [f"{item}は好きですか?", f"はい、{item}が大好きです。"]


def numbers_ja(rng: random.Random) -> list[str]:
    i = rng.randrange(len(NUMBERS_JA) - 1)
    return [f"{NUMBERS_JA[i]}の次は?", f"{NUMBERS_JA[i]}の次は{NUMBERS_JA[i + 1]}です。"]


QUESTIONS = [names, weather, food, numbers, colors, weather_ja, food_ja, numbers_ja]


def dialogue(rng: random.Random) -> list[str]:
    turns = greeting(rng) if rng.random() < 0.3 else []
    for _ in range(rng.choice([1, 1, 2, 2, 3])):
        turns += rng.choice(QUESTIONS)(rng)
    if rng.random() < 0.15:
        turns += goodbye(rng)
    return turns


# Known words in combinations no corpus dialogue contains anywhere (checked below).
HELD_OUT = [
    {"turns": ["Hi!", "Hello! How are you?", "I am fine, thank you.", "Glad to hear it.",
               "How is the weather in Oslo?"], "expected": "It is snowy in Oslo today."},
    {"turns": ["My name is Rosa.", "Nice to meet you, Rosa!", "Do you like olives?"],
     "expected": "No, I do not like olives."},
    {"turns": ["Do you like cheese?", "Yes, I love cheese.", "What color is the grass?"],
     "expected": "The grass is green."},
    {"turns": ["What color is the snow?", "The snow is white.", "What comes after 17?"],
     "expected": "18 comes after 17."},
    {"turns": ["Good morning!", "Hello! How are you?", "I am fine, thank you.",
               "Glad to hear it.", "My name is Hiro."], "expected": "Nice to meet you, Hiro!"},
    {"turns": ["こんにちは", "こんにちは!元気ですか?", "元気です、ありがとう。", "よかったです。",
               "東京の天気はどうですか?"], "expected": "東京は今日晴れです。"},
    {"turns": ["ラーメンは好きですか?", "はい、ラーメンが大好きです。", "大阪の天気はどうですか?"],
     "expected": "大阪は今日雨です。"},
]  # fmt: skip


def contains(turns: list[str], part: list[str]) -> bool:
    """Whether `part` occurs in `turns` as consecutive turns."""
    n = len(part)
    return any(turns[i : i + n] == part for i in range(len(turns) - n + 1))


def tsv_line(turns: list[str]) -> str:
    """DialoGPT's weighted form: the responder's turns weigh 1.0, the other side's 0.0."""
    last = len(turns) - 1
    weighted = [f"{1.0 if (last - i) % 2 == 0 else 0.0} {t}" for i, t in enumerate(turns)]
    return " EOS ".join(weighted[:-1]) + "\t" + weighted[-1]


def main() -> None:
    rng = random.Random(SEED)
    dialogues: list[list[str]] = []
    while len(dialogues) < DIALOGUES:
        d = dialogue(rng)
        if not any(contains(d, context["turns"]) for context in HELD_OUT):
            dialogues.append(d)
    with open(BUNDLED / "dialogues.jsonl", "w", encoding="utf-8") as f:
        for d in dialogues:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    with open(HERE / "dialogues.tsv", "w", encoding="utf-8") as f:
        for d in dialogues:
            f.write(tsv_line(d) + "\n")
    with open(HERE / "dialogues.txt", "w", encoding="utf-8") as f:
        f.write("\n\n".join("\n".join(d) for d in dialogues) + "\n")
    with open(BUNDLED / "contexts.jsonl", "w", encoding="utf-8") as f:
        for context in HELD_OUT:
            f.write(json.dumps(context, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
