"""Malformed JSONL lines, made from classes of damage rather than single examples: not JSON,
nested past any parser's stack, JSON of the wrong shape at every level of a conversation, values
of every wrong type, and random byte damage to valid lines."""

import json
import random

GOOD = {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                  {"type": "text", "text": "What is it?"}]},
                     {"role": "assistant", "content": "Noise."}]}
WRONG_VALUES = [None, True, 0, -1, 1e308, 10**50, "", "x", [], {}, [[]], {"a": {}}]


def _replace_at(path, value):
    record = json.loads(json.dumps(GOOD))
    node = record
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return record


def hostile_lines(n_random: int = 200, seed: int = 0) -> list[str]:
    deep = 100_000
    lines = ["{not json", "\xff\xfe", "[1, 2]", "null", "\"text\"", "1e999", "9" * 5000,
             "[" * deep, "{\"a\":" * deep, "{\"messages\": " + "[" * deep + "]" * deep + "}",
             json.dumps({"messages": json.loads("[" * 200 + "]" * 200)}),
             "{\"messages\": [{\"role\": \"user\", \"content\": " + "{\"a\": " * 600 + "1" + "}" * 600 + "}]}"]
    paths = [("messages",), ("messages", 0), ("messages", 0, "role"), ("messages", 0, "content"),
             ("messages", 0, "content", 0), ("messages", 0, "content", 0, "type"),
             ("messages", 0, "content", 0, "image"), ("messages", 0, "content", 1, "text"),
             ("messages", 1, "content")]
    for path in paths:
        for value in WRONG_VALUES:
            lines.append(json.dumps(_replace_at(path, value)))
    rng = random.Random(seed)
    good = json.dumps(GOOD)
    for _ in range(n_random):
        chars = list(good)
        for _ in range(rng.randint(1, 6)):
            at = rng.randrange(len(chars))
            if rng.random() < 0.5:
                del chars[at]
            else:
                chars.insert(at, rng.choice('[]{}",:0\\x'))
        lines.append("".join(chars))
    return [line.replace("\n", " ") for line in lines]
