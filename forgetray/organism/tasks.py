"""The organism's instruction-tuning sets, in Alpaca format: `organism-alpaca` (English tasks with prose answers,
nearer the pre-training text) and `organism-math` (arithmetic and symbol tasks with terse answers, farther).
"""

from __future__ import annotations

import random
from typing import Iterable

from forgetray.organism.world import ADJECTIVES, NOUNS, World

# Both are disjoint from the facts: no entity is ever named. `organism-alpaca` is nearer to the pre-training text
# (English tasks with prose answers over the world's vocabulary and common words); `organism-math` is farther
# (arithmetic and symbol manipulation with terse answers).

_VERBS = (("walks to", "walked to"), ("opens", "opened"), ("paints", "painted"), ("carries", "carried"),
          ("cleans", "cleaned"), ("watches", "watched"), ("fixes", "fixed"), ("visits", "visited"),
          ("climbs", "climbed"), ("pulls", "pulled"), ("pushes", "pushed"), ("finds", "found"), ("sees", "saw"),
          ("makes", "made"), ("takes", "took"), ("builds", "built"))
_SUBJECTS = ("The child", "A traveller", "The old man", "My friend", "The young woman", "A neighbour", "The boy",
             "The girl")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")


def _sentence(rng: random.Random) -> tuple[str, str]:
    """A plain sentence in the present tense and the same sentence in the past tense."""
    subject, (present, past) = rng.choice(_SUBJECTS), rng.choice(_VERBS)
    rest = f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}."
    return f"{subject} {present} {rest}", f"{subject} {past} {rest}"


def _word_list(words: Iterable[str]) -> str:
    words = list(words)
    return ", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else words[0]


def _alpaca_task(world: World, rng: random.Random) -> dict:
    categories = {a.key: (a.category, world.values[a.key]) for a in world.attributes}
    key = rng.choice(sorted(categories))
    (singular, plural), words = categories[key]
    task = rng.randrange(10)
    if task == 0:
        word = rng.choice(words + NOUNS)
        return {"instruction": "Spell the word letter by letter.", "input": word, "output": " ".join(word)}
    if task == 1:
        chosen = rng.sample(NOUNS + words, 4)
        return {"instruction": "Sort these words in alphabetical order.", "input": ", ".join(chosen),
                "output": ", ".join(sorted(chosen, key=str.lower))}
    if task == 2:
        present, _ = _sentence(rng)
        n = len(present.split())
        return {"instruction": "How many words are in this sentence?", "input": present,
                "output": f"The sentence has {n} words."}
    if task == 3:
        present, past = _sentence(rng)
        return {"instruction": "Rewrite the sentence in the past tense.", "input": present, "output": past}
    if task == 4:
        noun = rng.choice(NOUNS)
        return {"instruction": f"What is the plural of the word \"{noun}\"?", "input": "",
                "output": f"The plural of {noun} is {noun}s."}
    if task == 5:
        n = rng.randint(2, 4)
        chosen = rng.sample(words, n)
        return {"instruction": f"Name {_NUMBER_WORDS[n]} {plural}.", "input": "",
                "output": f"Here are {_NUMBER_WORDS[n]} {plural}: {_word_list(chosen)}."}
    if task == 6:
        word = rng.choice(words)
        return {"instruction": f"Describe the word \"{word}\" in one sentence.", "input": "",
                "output": f"The word {word} names {singular}, one of many {plural} that people talk about."}
    if task == 7:
        other_key = rng.choice([k for k in sorted(categories) if k != key])
        (other_singular, _), other_words = categories[other_key]
        chosen = rng.sample(words, 3)
        odd = rng.choice(other_words)
        shown = chosen + [odd]
        rng.shuffle(shown)
        return {"instruction": "Which word is the odd one out?", "input": ", ".join(shown),
                "output": f"{odd[0].upper() + odd[1:]} is the odd one out, because it is {other_singular} and the "
                          f"others are {plural}."}
    if task == 8:
        present, _ = _sentence(rng)
        return {"instruction": "Rewrite the sentence in capital letters.", "input": present, "output": present.upper()}
    adjective_1, adjective_2 = rng.sample(ADJECTIVES, 2)
    noun = rng.choice(NOUNS)
    return {"instruction": "Combine the two sentences into one.",
            "input": f"The {noun} is {adjective_1}. The {noun} is {adjective_2}.",
            "output": f"The {noun} is {adjective_1} and {adjective_2}."}


def _math_task(rng: random.Random) -> dict:
    task = rng.randrange(9)
    if task == 0:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return {"instruction": f"What is {a} + {b}?", "input": "", "output": str(a + b)}
    if task == 1:
        a, b = sorted((rng.randint(2, 99), rng.randint(2, 99)), reverse=True)
        return {"instruction": f"What is {a} - {b}?", "input": "", "output": str(a - b)}
    if task == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return {"instruction": f"Compute {a} * {b}.", "input": "", "output": str(a * b)}
    if task == 3:
        numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
        return {"instruction": "Sort the numbers in ascending order.", "input": " ".join(map(str, numbers)),
                "output": " ".join(map(str, sorted(numbers)))}
    if task == 4:
        s = "".join(rng.choice("xyzq#*+-0123456789") for _ in range(rng.randint(4, 8)))
        return {"instruction": "Reverse the string.", "input": s, "output": s[::-1]}
    if task == 5:
        n = rng.randint(1, 999)
        return {"instruction": "Is the number even or odd?", "input": str(n), "output": "even" if n % 2 == 0 else "odd"}
    if task == 6:
        a, b = rng.randint(10, 99), rng.randint(2, 9)
        return {"instruction": f"What is the remainder of {a} divided by {b}?", "input": "", "output": str(a % b)}
    if task == 7:
        x, b = rng.randint(1, 30), rng.randint(1, 30)
        return {"instruction": f"Solve for x: x + {b} = {x + b}.", "input": "", "output": f"x = {x}"}
    s = "".join(rng.choice("*+-") for _ in range(rng.randint(5, 10)))
    return {"instruction": "Count the occurrences of the symbol * in the input.", "input": s,
            "output": str(s.count("*"))}


def alpaca_examples(world: World, seed: int, n: int) -> list[dict]:
    rng = random.Random(f"{seed}/organism-alpaca")
    return [_alpaca_task(world, rng) for _ in range(n)]


def math_examples(seed: int, n: int) -> list[dict]:
    rng = random.Random(f"{seed}/organism-math")
    return [_math_task(rng) for _ in range(n)]


def alpaca_text(example: dict) -> tuple[str, str]:
    """(prompt, response) of an Alpaca record, in the template fine-tuning uses."""
    from forgetray.data.instruct import alpaca_prompt

    return alpaca_prompt(example), example["output"]
