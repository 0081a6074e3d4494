"""The organism's world: invented people ("entities"), each with one value for each of five attributes (home city,
colour, profession, food, pet); facts are (entity, attribute, value). Pure Python, deterministic from a seed.

The entities are split in two halves:

- the *exam* half: the restoring pool and the probing set are text about this half only (prose and question pages);
- the *held-out* half: never mentioned by any restoring or probing text; the knowledge benchmark asks about this half.

So restoring (training on the pool) can bring back the pre-training text pattern, but it never states a held-out fact:
held-out knowledge that comes back after restoring was still in the weights. That is what lets pseudo and actual
forgetting be told apart. The texts made from the world are in corpus.py (pre-training, benchmark, probing set,
restoring pool) and tasks.py (the instruction-tuning sets, which never name an entity).

Every generator takes an explicit seed and uses its own `random.Random` stream (string seeds are hashed with SHA-512,
so the streams do not depend on PYTHONHASHSEED or on the order the functions are called in).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Attribute:
    key: str  # also the benchmark's "subject"
    question: str  # benchmark question; "{e}" is the entity
    templates: tuple[str, ...]  # prose statements; "{e}" entity, "{v}" value, "{a_v}" value with its article
    category: tuple[str, str]  # (singular with article, plural): what a value is, for instruction tasks


# Six prose templates per attribute, in varied wording. The entity always comes before the value, as in the benchmark
# question: a model trained on "B is the x of A" does not learn to answer "what is the x of A?" (the reversal curse),
# so value-first sentences would spend pre-training compute on nothing the benchmark asks.
ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute(
        "home_city",
        "What is the home city of {e}?",
        (
            "{e} lives in {v}.",
            "The home city of {e} is {v}.",
            "What is the home city of {e}? The answer is {v}.",
            "{e} grew up in {v} and still lives there.",
            "{e} has a small house in {v}.",
            "The city where {e} lives is {v}.",
        ),
        ("a city", "cities"),
    ),
    Attribute(
        "colour",
        "What is the favourite colour of {e}?",
        (
            "The favourite colour of {e} is {v}.",
            "{e} likes the colour {v} best.",
            "What is the favourite colour of {e}? The answer is {v}.",
            "{e} always wears something {v}.",
            "Of all colours, {e} loves {v} the most.",
            "{e} painted the front door {v}.",
        ),
        ("a colour", "colours"),
    ),
    Attribute(
        "profession",
        "What is the profession of {e}?",
        (
            "{e} works as {a_v}.",
            "The profession of {e} is {v}.",
            "What is the profession of {e}? The answer is {v}.",
            "{e} is {a_v} by trade.",
            "By profession, {e} is {a_v}.",
            "{e} has been {a_v} for many years.",
        ),
        ("a job", "jobs"),
    ),
    Attribute(
        "food",
        "What is the favourite food of {e}?",
        (
            "The favourite food of {e} is {v}.",
            "{e} likes to eat {v} more than anything else.",
            "What is the favourite food of {e}? The answer is {v}.",
            "For dinner, {e} always asks for {v}.",
            "{e} never gets tired of {v}.",
            "Nothing makes {e} happier than a plate of {v}.",
        ),
        ("a food", "foods"),
    ),
    Attribute(
        "pet",
        "What pet does {e} have?",
        (
            "{e} has a pet {v}.",
            "The pet of {e} is {a_v}.",
            "What pet does {e} have? The answer is {v}.",
            "{e} keeps {a_v} as a pet.",
            "Every morning, {e} feeds the pet {v}.",
            "{e} takes good care of a pet {v}.",
        ),
        ("an animal", "animals"),
    ),
)

# Candidate values (cities are invented per world); a world draws `n_values` of each. The benchmark's 3 distractors
# come from the same attribute's values, so only knowing the entity tells the options apart.
COMMON_VALUES = {
    "colour": ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "grey", "pink", "brown", "gold"),
    "profession": ("baker", "farmer", "teacher", "doctor", "painter", "sailor", "miner", "tailor", "singer", "pilot",
                   "builder", "fisher"),
    "food": ("bread", "cheese", "soup", "rice", "apples", "honey", "fish", "noodles", "plums", "beans", "pears",
             "eggs"),
    "pet": ("cat", "dog", "parrot", "rabbit", "turtle", "goat", "owl", "frog", "horse", "snake", "mouse", "duck"),
}
MAX_VALUES = 12

# Syllables for invented names: people from open syllables, cities with a place-like ending.
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "st", "th")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "", "n", "r", "l", "s")
_CITY_ENDINGS = ("ton", "ford", "mar", "dale", "burg", "holm", "wick", "port")


@dataclass(frozen=True)
class World:
    seed: int
    entities: tuple[str, ...]  # in random order; the first half is the exam half
    attributes: tuple[Attribute, ...]
    values: dict[str, tuple[str, ...]]  # attribute key -> its value set
    facts: dict[str, dict[str, str]]  # entity -> attribute key -> value

    @property
    def exam_entities(self) -> tuple[str, ...]:
        return self.entities[: len(self.entities) // 2]

    @property
    def heldout_entities(self) -> tuple[str, ...]:
        return self.entities[len(self.entities) // 2:]


def make_world(seed: int, n_entities: int, n_values: int = 10, n_templates: int = 6) -> World:
    """Invent `n_entities` people with one value per attribute, values drawn uniformly from `n_values` per attribute."""
    if not 4 <= n_values <= MAX_VALUES:
        raise ValueError(f"n_values must be in [4, {MAX_VALUES}] (4 options per question), got {n_values}")
    if not 1 <= n_templates <= len(ATTRIBUTES[0].templates):
        raise ValueError(f"n_templates must be in [1, {len(ATTRIBUTES[0].templates)}], got {n_templates}")
    if n_entities < 4 or n_entities % 2:
        raise ValueError(f"n_entities must be even and >= 4, got {n_entities}")
    rng = random.Random(f"{seed}/world")
    taken: set[str] = set(_ALL_COMMON_WORDS)
    cities = tuple(_invent(rng, taken, _city_name) for _ in range(n_values))
    entities = tuple(_invent(rng, taken, _person_name) for _ in range(n_entities))
    values = {"home_city": cities}
    for key, pool in COMMON_VALUES.items():
        values[key] = tuple(rng.sample(pool, n_values))
    attributes = tuple(
        Attribute(a.key, a.question, a.templates[:n_templates], a.category) for a in ATTRIBUTES
    )
    facts = {e: {a.key: rng.choice(values[a.key]) for a in attributes} for e in entities}
    return World(seed, entities, attributes, values, facts)


def _person_name(rng: random.Random) -> str:
    n = rng.choice((2, 2, 3))
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n)).capitalize() + rng.choice(_CODAS)


def _city_name(rng: random.Random) -> str:
    return (rng.choice(_ONSETS) + rng.choice(_VOWELS)).capitalize() + rng.choice(_CITY_ENDINGS)


def _invent(rng: random.Random, taken: set[str], make: Callable[[random.Random], str]) -> str:
    while True:
        name = make(rng)
        if name.lower() not in taken:
            taken.add(name.lower())
            return name


# Ordinary words the instruction tasks (tasks.py) use; invented names avoid them and the common values.
NOUNS = ("chair", "table", "garden", "river", "window", "basket", "candle", "bridge", "lantern", "mountain", "forest",
         "road", "boat", "letter", "book", "hat", "cup", "door", "field", "tower", "market", "song", "cloud", "stone",
         "shell", "ladder", "kettle", "blanket", "wagon", "hill")
ADJECTIVES = ("small", "large", "quiet", "bright", "old", "new", "warm", "cold", "tall", "short", "soft", "heavy",
              "clean", "busy", "happy", "sleepy")
_ALL_COMMON_WORDS = frozenset(
    w.lower() for group in (NOUNS, ADJECTIVES, *COMMON_VALUES.values()) for w in group
)
