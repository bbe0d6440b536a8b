"""A template grammar of short English-like stories whose hidden structure is known.

Every generated document is a :class:`Sample`: its text plus the latent variables that produced
it, so an analysis can ask "where is the indirect object?" and get the answer from the data
rather than from a guess. Five kinds of document teach five things:

``ioi``        indirect-object sentences: "When Mary and John went to the store, John gave a
               bag to" → " Mary". The answer is the name of the pair that is *not* repeated.
``repeat``     a small cast in a short story; a character named early is named again later,
               so predicting the later mention means copying a name seen earlier.
``agreement``  subject-verb agreement: "The dogs near the park" → " are", not " is".
``copy``       a list of words written twice; predicting the second copy is induction.
``story``      characters, places and objects without any of the above structure.

Held-out names: the names are split in two. ``IOI_NAMES`` fill the indirect-object sentences
the model trains on; ``HELD_OUT_NAMES`` never appear in one, but do appear everywhere else
(repeated-name stories, pairs introduced together, agreement, lists), so their embeddings
and unembeddings are trained. Indirect-object accuracy measured on held-out names therefore
shows a mechanism that moves *whichever* name is the indirect object, not a memorised table.

Everything is a pure function of a ``random.Random``; offsets are character offsets into
``Sample.text`` of the first letter of a word (not of the space before it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

Kind = Literal["ioi", "repeat", "agreement", "copy", "story"]
Split = Literal["train", "held_out"]
KINDS: tuple[Kind, ...] = ("ioi", "repeat", "agreement", "copy", "story")

IOI_NAMES = (
    "James", "Robert", "David", "William", "Richard", "Thomas", "Daniel", "Paul", "Mark", "George",
    "Kevin", "Jason", "Brian", "Edward", "Steven", "Adam", "Anna", "Laura", "Sarah", "Emma",
    "Lisa", "Karen", "Nancy", "Helen", "Amy", "Rose", "Grace", "Alice", "Kate", "Jane",
    "Ruth", "Carl",
)  # fmt: skip
HELD_OUT_NAMES = ("Mary", "John", "Michael", "Linda", "Susan", "Peter", "Lucy", "Tom", "Sam", "Claire")
NAMES = IOI_NAMES + HELD_OUT_NAMES
PLACES = (
    "store", "park", "school", "market", "beach", "garden", "office", "library", "station", "restaurant",
    "hospital", "kitchen", "forest", "river", "farm", "church", "museum", "cafe", "zoo", "bakery",
)  # fmt: skip
OBJECTS = (
    "bag", "ball", "book", "cup", "key", "ring", "hat", "box", "pen", "drink",
    "letter", "basket", "coin", "flower", "snack", "bottle", "map", "bell", "toy", "gift",
)  # fmt: skip
GIVE_VERBS = ("gave", "handed", "passed", "sent", "showed", "brought", "threw", "offered")
ADJECTIVES = ("happy", "tired", "hungry", "busy", "quiet", "sad", "kind", "brave", "late", "ready")
NOUNS = (  # (singular, plural) subjects for agreement
    ("dog", "dogs"), ("cat", "cats"), ("bird", "birds"), ("horse", "horses"), ("child", "children"),
    ("man", "men"), ("woman", "women"), ("teacher", "teachers"), ("farmer", "farmers"), ("student", "students"),
)  # fmt: skip
VERBS = (  # (singular, plural, what follows)
    ("is", "are", "{adj}"), ("was", "were", "{adj}"), ("has", "have", "a {object}"),
    ("likes", "like", "the {object}"), ("wants", "want", "a {object}"), ("sees", "see", "the {object}"),
)  # fmt: skip

# Indirect-object templates: {A} and {B} are introduced, {S} (one of them) acts, the prefix ends
# just before the recipient. ABBA order: A is the indirect object; BABA: B is.
IOI_TEMPLATES = (
    "When {A} and {B} went to the {place}, {S} {give} a {object} to",
    "After {A} and {B} went to the {place}, {S} {give} a {object} to",
    "While {A} and {B} were at the {place}, {S} {give} a {object} to",
    "Then, {A} and {B} went to the {place}. {S} {give} a {object} to",
    "{A} and {B} had lunch at the {place}. {S} {give} a {object} to",
    "When {A} and {B} got a {object} at the {place}, {S} decided to give it to",
    "Friends {A} and {B} found a {object} at the {place}. {S} {give} it to",
    "The {place} was busy when {A} and {B} arrived. {S} {give} a {object} to",
)
ONE_PERSON = (
    "{X} went to the {place}.",
    "{X} found a {object} at the {place}.",
    "{X} liked the {object}.",
    "{X} was {adj}.",
    "{X} walked home.",
    "{X} took a {object} to the {place}.",
    "{X} looked at the {animal}.",
    "{X} lost a {object}.",
)
TWO_PEOPLE = (  # introductions only: a second name is never predictable from the first
    "{X} and {Y} went to the {place}.",
    "{X} met {Y} at the {place}.",
    "{X} and {Y} were at the {place}.",
)
SCENES = ("It was a {adj} day.", "The {place} was quiet.", "The {animal} was {adj}.", "A {object} was on the table.")
OPENERS = ("", "", "Then ", "Later, ", "After that, ", "Soon ")
PREPOSITIONS = ("", " near the {place}", " in the {place}", " at the {place}", " next to the {place}")


@dataclass(frozen=True)
class Sample:
    """One document and the latent variables that generated it (fields unused by a kind are None)."""

    text: str
    kind: Kind
    names: tuple[str, ...] = ()  # every name in the text, in order of first appearance
    # ioi: text = prompt + answer + "."
    prompt: str | None = None  # the text before the predicted word (ioi, agreement)
    answer: str | None = None  # the predicted word with its leading space: " Mary", " are"
    io: str | None = None  # the indirect object (the answer)
    subject: str | None = None  # the repeated name, the one who gives
    order: Literal["ABBA", "BABA"] | None = None
    template: int | None = None
    place: str | None = None
    object: str | None = None
    # repeat: the repeated name, its first appearance and every later one
    repeated: str | None = None
    first_offset: int | None = None
    repeat_offsets: tuple[int, ...] = ()
    # agreement
    number: Literal["singular", "plural"] | None = None
    wrong: str | None = None  # the verb form that would not agree: " is" when " are" is right
    # copy: the words written twice, and where each copy starts
    words: tuple[str, ...] = ()
    copy_offsets: tuple[int, ...] = ()


def fill(template: str, rng: random.Random, **slots: str) -> str:
    """``template`` with its named slots filled; place, object, adjective and animal drawn from ``rng``."""
    defaults = {
        "place": rng.choice(PLACES),
        "object": rng.choice(OBJECTS),
        "adj": rng.choice(ADJECTIVES),
        "animal": rng.choice(NOUNS)[0],
        "give": rng.choice(GIVE_VERBS),
    }
    return template.format(**{**defaults, **slots})


def name_pool(split: Split) -> tuple[str, ...]:
    if split == "train":
        return IOI_NAMES
    if split == "held_out":
        return HELD_OUT_NAMES
    raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")


def ioi(rng: random.Random, split: Split = "train", template: int | None = None) -> Sample:
    """An indirect-object sentence with both names from ``split``; ABBA and BABA equally often."""
    io, subject = rng.sample(name_pool(split), 2)
    template = rng.randrange(len(IOI_TEMPLATES)) if template is None else template
    order = rng.choice(("ABBA", "BABA"))
    first, second = (io, subject) if order == "ABBA" else (subject, io)
    place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
    prompt = fill(IOI_TEMPLATES[template], rng, A=first, B=second, S=subject, place=place, object=obj)
    answer = " " + io
    return Sample(
        text=prompt + answer + ".",
        kind="ioi",
        names=(first, second),
        prompt=prompt,
        answer=answer,
        io=io,
        subject=subject,
        order=order,
        template=template,
        place=place,
        object=obj,
    )


def repeat(rng: random.Random) -> Sample:
    """A story of one or two characters in which the first-named one is named again later."""
    cast = rng.sample(NAMES, rng.choice((1, 2)))
    hero = cast[0]
    sentences = [fill(rng.choice(SCENES), rng)] if rng.random() < 0.5 else []
    if len(cast) == 1:
        sentences.append(fill(rng.choice(ONE_PERSON), rng, X=hero))
    else:
        sentences.append(fill(rng.choice(TWO_PEOPLE), rng, X=hero, Y=cast[1]))
    actors = [hero] + [rng.choice(cast) for _ in range(rng.randint(0, 2))]
    for actor in actors:
        sentences.append(rng.choice(OPENERS) + fill(rng.choice(ONE_PERSON), rng, X=actor))
    text = " ".join(sentences)
    offsets = word_offsets(text, hero)
    return Sample(
        text=text,
        kind="repeat",
        names=tuple(cast),
        repeated=hero,
        first_offset=offsets[0],
        repeat_offsets=tuple(offsets[1:]),
    )


def agreement(rng: random.Random) -> Sample:
    """A subject, an optional prepositional phrase, then the verb that must agree in number."""
    plural = rng.random() < 0.5
    if rng.random() < 0.3:  # names: "Mary is", "Mary and John are"
        cast = rng.sample(NAMES, 2 if plural else 1)
        subject = " and ".join(cast)
    else:
        cast = []
        subject = "The " + rng.choice(NOUNS)[int(plural)]
    singular_verb, plural_verb, rest = rng.choice(VERBS)
    verb, wrong = (plural_verb, singular_verb) if plural else (singular_verb, plural_verb)
    prompt = subject + fill(rng.choice(PREPOSITIONS), rng)
    text = prompt + " " + verb + " " + fill(rest, rng) + "."
    return Sample(
        text=text,
        kind="agreement",
        names=tuple(cast),
        prompt=prompt,
        answer=" " + verb,
        number="plural" if plural else "singular",
        wrong=" " + wrong,
    )


COPY_FRAMES = (  # {list} is written twice; some frames start with it, as the repeated-random-words test does
    ("{X} wrote down the words ", ". Then {Y} read out the words ", "."),
    ("{X} said: ", ". {Y} said: ", "."),
    ("", ". ", "."),
    ("", " ", "."),
    ("{X} sang ", " ", "."),
    ("", ", said {X}. ", ", said {Y}."),
)


def copy(rng: random.Random) -> Sample:
    """A list of random words written twice: the second copy is predictable only by copying (induction)."""
    writer, reader = rng.sample(NAMES, 2)
    pool = PLACES + OBJECTS + ADJECTIVES + tuple(singular for singular, _ in NOUNS) + NAMES
    words = tuple(rng.choice(pool) for _ in range(rng.randint(3, 12)))
    listed = " ".join(words)
    before, between, after = (part.format(X=writer, Y=reader) for part in rng.choice(COPY_FRAMES))
    text = before + listed + between + listed + after
    return Sample(
        text=text,
        kind="copy",
        names=names_in(text),
        words=words,
        copy_offsets=(len(before), len(before) + len(listed) + len(between)),
    )


def story(rng: random.Random) -> Sample:
    """Scenes and single-character sentences with no repeated name: the background of the corpus."""
    cast = rng.sample(NAMES, rng.randint(1, 3))
    sentences = [fill(rng.choice(SCENES), rng)]
    sentences += [fill(rng.choice(ONE_PERSON), rng, X=name) for name in cast]
    return Sample(text=" ".join(sentences), kind="story", names=tuple(cast))


GENERATORS = {"ioi": ioi, "repeat": repeat, "agreement": agreement, "copy": copy, "story": story}
DEFAULT_MIX: dict[Kind, float] = {"ioi": 0.5, "repeat": 0.15, "agreement": 0.1, "copy": 0.15, "story": 0.1}


def sample(rng: random.Random, mix: dict[Kind, float] | None = None) -> Sample:
    """One training document, its kind drawn with the weights of ``mix``."""
    mix = DEFAULT_MIX if mix is None else mix
    kind = rng.choices(list(mix), weights=list(mix.values()))[0]
    return GENERATORS[kind](rng)


def corpus(seed: int, n: int, mix: dict[Kind, float] | None = None) -> list[Sample]:
    """``n`` training documents from ``seed`` (indirect-object sentences use training names only)."""
    rng = random.Random(seed)
    return [sample(rng, mix) for _ in range(n)]


def names_in(text: str) -> tuple[str, ...]:
    """The names occurring in ``text``, in order of first appearance."""
    found = {name: offsets[0] for name in NAMES if (offsets := word_offsets(text, name))}
    return tuple(sorted(found, key=found.get))


def word_offsets(text: str, word: str) -> list[int]:
    """Character offsets of every whole-word occurrence of ``word`` in ``text``."""
    offsets, start = [], 0
    while (index := text.find(word, start)) != -1:
        before = text[index - 1] if index else " "
        after = text[index + len(word)] if index + len(word) < len(text) else " "
        if not before.isalnum() and not after.isalnum():
            offsets.append(index)
        start = index + 1
    return offsets
