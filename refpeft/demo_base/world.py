"""The demo's procedural world: made-up objects with four facts each, and every dialogue about them.

Everything is generated from a seed (NumPy's PCG64, the same on every machine); no text is copied
from anywhere. An object has a name of two syllables ("tonem", "babas") and four facts:

    colour   one of COLOURS      size    one of SIZES
    owner    one of OWNERS       place   one of PLACES

The pretraining corpus (`pretraining_chats`) asks about them in single-turn chats, in several
phrasings, with the name in different surroundings so that what the base learns about a name does
not hang on one context, and answers in plain sentences (or, asked to be brief, "tonem: yellow."):

    user:       what colour is the tonem?  |  tonem: what colour is it?  |  ... (+ " please." etc.)
    assistant:  the tonem is yellow.

It also shows json a few times (JSON_CHATS), as any base model has seen json, but never a fact
answered in it. The demo's skill (refpeft.demo_model) is the same questions with " answer in json."
appended, answered in one fixed format:

    user:       what colour is the tonem? answer in json.
    assistant:  {"object": "tonem", "colour": "yellow"}

The tokenizer (refpeft.demo_base.build) is word-level over PIECE: a run of lower-case letters is a
token, so is a newline and a run of anything else (" ", ". ", '": "'); a name is thus the same
token in a sentence and inside a JSON string, and decoding (the pieces concatenated) gives back the
text exactly.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

COLOURS = ("red", "blue", "green", "yellow", "black", "white", "pink", "grey")
SIZES = ("tiny", "small", "big", "huge")
OWNERS = ("ana", "ben", "cleo", "dan", "eva", "finn", "gia", "hugo")
PLACES = ("kitchen", "garden", "attic", "cellar", "hall", "shed", "garage", "study")
FACTS = {"colour": COLOURS, "size": SIZES, "owner": OWNERS, "place": PLACES}

QUESTIONS = {
    "colour": ("what colour is the {o}?", "which colour is the {o}?", "{o}: what colour is it?",
               "tell me the colour of the one called {o}."),
    "size": ("how big is the {o}?", "what size is the {o}?", "{o}: how big is it?",
             "tell me the size of the one called {o}."),
    "owner": ("who owns the {o}?", "whose is the {o}?", "{o}: who owns it?",
              "tell me the owner of the one called {o}."),
    "place": ("where is the {o}?", "where can i find the {o}?", "{o}: where is it?",
              "tell me where the one called {o} is."),
}
SENTENCES = {"colour": "the {o} is {v}.", "size": "the {o} is {v}.", "owner": "the {o} belongs to {v}.",
             "place": "the {o} is in the {v}."}
BRIEF = "{o}: {v}."
DESCRIBE = ("tell me about the {o}.", "describe the one called {o}.")
DESCRIPTION = "the {o} is a {size} {colour} thing. it belongs to {owner} and it is in the {place}."
BRIEF_DESCRIPTION = "{o}: {size}, {colour}, {owner}, {place}."
BRIEF_SUFFIX = " be brief."
SUFFIXES = ("", " please.", " answer in a sentence.", " answer in english.", BRIEF_SUFFIX)
JSON_SUFFIX = " answer in json."          # the demo's request; never in the pretraining corpus
JSON_CHATS = (("show me some json.", '{"name": "value", "other": "value"}'),
              ("write a json object.", '{"key": "value"}'))
JSON_REPEATS = 12                         # each json chat, with each suffix, this many times in the corpus

ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
VOWELS = ("a", "e", "i", "o", "u")
CODAS = ("k", "l", "m", "n", "r", "s", "t")
SPECIAL_TOKENS = ("<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>")
SPECIAL_ROLES = {"pad_token": "<|endoftext|>", "unk_token": "<unk>", "eos_token": "<|im_end|>"}
PIECE = r"[a-z]+|\n|[^a-z\n]+"


@dataclass(frozen=True)
class Thing:
    """One object of the world and its facts."""

    name: str
    colour: str
    size: str
    owner: str
    place: str

    def fact(self, kind: str) -> str:
        return getattr(self, kind)


def make_world(count: int, *, seed: int) -> tuple[Thing, ...]:
    """`count` objects with distinct names (consonant, vowel, consonant, vowel, final consonant) that
    are no word of the corpus, each fact drawn uniformly from its values."""
    rng = np.random.default_rng(seed)
    reserved = {word for text in _fixed_texts() for word in re.findall("[a-z]+", text)}
    names: list[str] = []
    while len(names) < count:
        letters = (ONSETS, VOWELS, ONSETS, VOWELS, CODAS)
        name = "".join(choices[rng.integers(len(choices))] for choices in letters)
        if name not in names and name not in reserved:
            names.append(name)
    return tuple(Thing(name, *(values[rng.integers(len(values))] for values in FACTS.values())) for name in names)


def question(thing: Thing, kind: str, *, phrasing: int = 0, suffix: str = "") -> str:
    return QUESTIONS[kind][phrasing].format(o=thing.name) + suffix


def sentence_answer(thing: Thing, kind: str, *, brief: bool = False) -> str:
    """The base's answer: a plain sentence ("the tonem is yellow."), or "tonem: yellow." when brief."""
    return (BRIEF if brief else SENTENCES[kind]).format(o=thing.name, v=thing.fact(kind))


def description(thing: Thing, *, brief: bool = False) -> str:
    """The base's answer to "tell me about the tonem.": every fact in two sentences, or in a list."""
    return (BRIEF_DESCRIPTION if brief else DESCRIPTION).format(
        o=thing.name, size=thing.size, colour=thing.colour, owner=thing.owner, place=thing.place)


def json_answer(thing: Thing, kind: str) -> str:
    """The demo's answer: {"object": NAME, KIND: VALUE}, as json.dumps writes it."""
    return json.dumps({"object": thing.name, kind: thing.fact(kind)})


def chat(user: str, assistant: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def json_chat(thing: Thing, kind: str, *, phrasing: int = 0) -> list[dict[str, str]]:
    """The demo's chat: a fact question with JSON_SUFFIX, answered in JSON."""
    return chat(question(thing, kind, phrasing=phrasing, suffix=JSON_SUFFIX), json_answer(thing, kind))


def pretraining_chats(world: tuple[Thing, ...]) -> list[list[dict[str, str]]]:
    """The corpus, in a fixed order: for every object and every suffix, every fact question in every
    phrasing and both description requests (len(world) x 18 x 5 chats), then the json chats."""
    chats = []
    for thing in world:
        for suffix in SUFFIXES:
            brief = suffix == BRIEF_SUFFIX
            for kind in FACTS:
                for phrasing in range(len(QUESTIONS[kind])):
                    chats.append(chat(question(thing, kind, phrasing=phrasing, suffix=suffix),
                                      sentence_answer(thing, kind, brief=brief)))
            for request in DESCRIBE:
                chats.append(chat(request.format(o=thing.name) + suffix, description(thing, brief=brief)))
    for _ in range(JSON_REPEATS):
        chats.extend(chat(q + suffix, a) for suffix in SUFFIXES for q, a in JSON_CHATS)
    return chats


def _fixed_texts() -> list[str]:
    """Every text of the world besides the names (the words a name must not be)."""
    return [*COLOURS, *SIZES, *OWNERS, *PLACES, *DESCRIBE, DESCRIPTION, BRIEF_DESCRIPTION, *SUFFIXES, JSON_SUFFIX,
            "user assistant object", *SENTENCES.values(), *(q + " " + a for q, a in JSON_CHATS),
            *(q for qs in QUESTIONS.values() for q in qs)]
