"""How the synthetic VQA questions are worded: three sets of templates per question key.

- `CLASSIC`: the three phrasings per key that the first default models were trained on; the `test`
  split keeps asking them (its questions stay the same, byte for byte).
- `TRAIN`: the phrasings training draws from: the classic ones plus many more written for variety
  (British and American spelling, imperatives, object/shape/thing/figure, politeness, reordered options).
- `HELDOUT`: phrasings never used in training, nor in the tokenizer's training text; the
  `test-phrasing` evaluation split asks them.

A template is `(text, answer words)`: the text has slots `{c}` (colour) and `{s}` (kind) of the shape
asked about and `{c2}` `{s2}` of the other shape of a relation; the answer words, for relation_y only,
are what the template says for (above, below), so every answer repeats one of the question's options.
Non-classic questions are also lower-cased or lose their final mark some of the time (`surface`), and
training questions can have a word made up, dropped or added (`noise`), so that a word the model has
never seen (the tokenizer splits it into pieces) reads as noise and the question's type comes from
the words it shares with its kind: the colour or kind it names, the options it offers.
"""

from __future__ import annotations

import numpy as np

KEYS = (
    "colour",
    "shape",
    "count",
    "position_x",
    "position_y",
    "relation_x",
    "relation_y",
    "exists",
    "caption",
)
AB, HL, OU = ("above", "below"), ("higher", "lower"), ("over", "under")

CLASSIC: dict[str, tuple[tuple[str, tuple[str, str] | None], ...]] = {
    "colour": (
        ("What colour is the {s}?", None),
        ("What is the colour of the {s}?", None),
        ("Which colour does the {s} have?", None),
    ),
    "shape": (
        ("What shape is the {c} object?", None),
        ("What is the {c} shape?", None),
        ("Name the shape of the {c} object.", None),
    ),
    "count": (
        ("How many shapes are there?", None),
        ("How many objects are in the image?", None),
        ("Count the shapes.", None),
    ),
    "position_x": (
        ("Is the {c} {s} on the left or the right?", None),
        ("Which side of the image is the {c} {s} on?", None),
        ("Is the {c} {s} in the left or right half?", None),
    ),
    "position_y": (
        ("Is the {c} {s} at the top or the bottom?", None),
        ("Is the {c} {s} in the top or bottom half?", None),
        ("Where is the {c} {s}, top or bottom?", None),
    ),
    "relation_x": (
        ("Is the {c} {s} left or right of the {c2} {s2}?", None),
        ("Is the {c} {s} to the left or to the right of the {c2} {s2}?", None),
        ("Which side of the {c2} {s2} is the {c} {s} on?", None),
    ),
    "relation_y": (
        ("Is the {c} {s} above or below the {c2} {s2}?", AB),
        ("Is the {c} {s} higher or lower than the {c2} {s2}?", HL),
        ("Is the {c} {s} over or under the {c2} {s2}?", OU),
    ),
    "exists": (
        ("Is there a {c} {s}?", None),
        ("Does the image contain a {c} {s}?", None),
        ("Can you see a {c} {s}?", None),
    ),
    "caption": (
        ("Describe the image briefly.", None),
        ("Give a short caption.", None),
        ("What does the image show?", None),
    ),
}

_MORE: dict[str, tuple[tuple[str, tuple[str, str] | None], ...]] = {
    "colour": (
        ("What color is the {s}?", None),
        ("What is the color of the {s}?", None),
        ("Which color is the {s}?", None),
        ("Tell me the colour of the {s}.", None),
        ("Name the color of the {s}.", None),
        ("What colour does the {s} have?", None),
        ("Please tell me what color the {s} is.", None),
        ("The {s} is which colour?", None),
        ("What is the {s}'s colour?", None),
        ("Could you tell me the colour of the {s}, please?", None),
        ("Identify the color of the {s}.", None),
        ("Which colour is the {s} shape?", None),
    ),
    "shape": (
        ("What shape is the {c} thing?", None),
        ("What kind of shape is the {c} one?", None),
        ("Which shape is {c}?", None),
        ("What is the {c} object?", None),
        ("Tell me the shape of the {c} thing.", None),
        ("What form does the {c} object have?", None),
        ("Please name the {c} shape.", None),
        ("What is the shape of the {c} figure?", None),
        ("Identify the {c} object.", None),
        ("Could you tell me what the {c} shape is, please?", None),
        ("Which kind of object is {c}?", None),
    ),
    "count": (
        ("How many things are in the picture?", None),
        ("Count the objects in the image.", None),
        ("How many shapes do you see?", None),
        ("What is the number of shapes?", None),
        ("How many figures are shown?", None),
        ("Please count the things in the image.", None),
        ("Tell me how many objects there are.", None),
        ("How many shapes does the picture contain?", None),
        ("Number of objects?", None),
        ("Could you count the shapes, please?", None),
    ),
    "position_x": (
        ("Is the {c} {s} on the left or right side?", None),
        ("Left or right: where is the {c} {s}?", None),
        ("On which side is the {c} {s}?", None),
        ("Which half of the picture holds the {c} object, left or right?", None),
        ("Tell me whether the {c} {s} is on the left or the right.", None),
        ("Is the {c} {s} right or left?", None),
        ("Where is the {c} thing, left or right?", None),
        ("Please say if the {c} {s} is on the left or on the right.", None),
        ("Is the {c} {s} located in the left or the right half of the image?", None),
    ),
    "position_y": (
        ("Is the {c} {s} near the top or near the bottom?", None),
        ("Top or bottom: where is the {c} {s}?", None),
        ("Is the {c} object in the top or the bottom half of the image?", None),
        ("Which half holds the {c} {s}, top or bottom?", None),
        ("Tell me whether the {c} {s} is at the top or the bottom.", None),
        ("Is the {c} {s} bottom or top?", None),
        ("Please say if the {c} thing is at the top or at the bottom.", None),
        ("Is the {c} {s} in the top half or the bottom half of the picture?", None),
        ("Could you tell me if the {c} {s} is at the top or the bottom?", None),
    ),
    "relation_x": (
        ("Is the {c} {s} on the left or the right of the {c2} {s2}?", None),
        ("Relative to the {c2} {s2}, is the {c} {s} left or right?", None),
        ("Is the {c} object left or right of the {c2} object?", None),
        ("Where is the {c} {s} compared to the {c2} {s2}, left or right?", None),
        ("Tell me if the {c} {s} is to the left or right of the {c2} {s2}.", None),
        ("Compared with the {c2} {s2}, is the {c} {s} on the left or on the right?", None),
        ("Is the {c} thing right or left of the {c2} thing?", None),
        ("On which side of the {c2} {s2} is the {c} {s}, left or right?", None),
        ("Please say whether the {c} {s} lies left or right of the {c2} {s2}.", None),
    ),
    "relation_y": (
        ("Is the {c} object above or below the {c2} object?", AB),
        ("Relative to the {c2} {s2}, is the {c} {s} higher or lower?", HL),
        ("Is the {c} thing over or under the {c2} thing?", OU),
        ("Is the {c} {s} below or above the {c2} {s2}?", AB),
        ("Tell me if the {c} {s} is above or below the {c2} {s2}.", AB),
        ("Is the {c} {s} placed lower or higher than the {c2} {s2}?", HL),
        ("Does the {c} {s} appear above or below the {c2} {s2}?", AB),
        ("Please say whether the {c} {s} is over or under the {c2} {s2}.", OU),
        ("Compared with the {c2} {s2}, is the {c} {s} higher or lower?", HL),
    ),
    "exists": (
        ("Is there a {c} {s} in the image?", None),
        ("Do you see a {c} {s}?", None),
        ("Is a {c} {s} present?", None),
        ("Does the picture have a {c} {s}?", None),
        ("Is there any {c} {s}?", None),
        ("Tell me if there is a {c} {s}.", None),
        ("Can a {c} {s} be seen in the picture?", None),
        ("Does the image show a {c} {s}?", None),
        ("Please check: is there a {c} {s}?", None),
        ("Is there a {c} {s} anywhere in the picture?", None),
    ),
    "caption": (
        ("Describe the image.", None),
        ("Describe this picture.", None),
        ("Caption the image.", None),
        ("What is in the picture?", None),
        ("Give a brief description of the image.", None),
        ("Please describe what you see.", None),
        ("What do you see?", None),
        ("Write a short caption for this image.", None),
        ("Summarise the image.", None),
        ("Summarize the picture.", None),
        ("Describe this image.", None),
        ("What's in the image?", None),
    ),
}

TRAIN = {k: CLASSIC[k] + _MORE[k] for k in KEYS}

HELDOUT: dict[str, tuple[tuple[str, tuple[str, str] | None], ...]] = {
    "colour": (
        ("What is the {s}'s color?", None),
        ("Say the colour of the {s}.", None),
        ("Which colour has the {s} got?", None),
        ("Can you name the color of the {s}?", None),
        ("What colour is the {s} shape, please?", None),
    ),
    "shape": (
        ("What sort of shape is the {c} thing?", None),
        ("Say what the {c} figure is.", None),
        ("The {c} object is what shape?", None),
        ("Can you identify the {c} shape?", None),
        ("What's the {c} one?", None),
    ),
    "count": (
        ("How many shapes can you see in the image?", None),
        ("Count the things in the picture.", None),
        ("What's the number of objects in the picture?", None),
        ("How many figures are there?", None),
        ("Give me the number of shapes, please.", None),
    ),
    "position_x": (
        ("Does the {c} {s} sit on the left or on the right?", None),
        ("Which side is the {c} {s} on, left or right?", None),
        ("Can you tell if the {c} {s} is on the left or the right side of the picture?", None),
        ("Is the {c} object towards the left or the right?", None),
    ),
    "position_y": (
        ("Does the {c} {s} sit at the top or at the bottom?", None),
        ("Which half is the {c} {s} in, top or bottom?", None),
        ("Is the {c} thing closer to the top or the bottom of the picture?", None),
        ("Can you tell if the {c} {s} is in the top or bottom part of the image?", None),
    ),
    "relation_x": (
        ("Is the {c} {s} further left or further right than the {c2} {s2}?", None),
        ("Does the {c} {s} sit to the left or to the right of the {c2} {s2}?", None),
        ("Seen from the {c2} {s2}, is the {c} {s} on the left or the right?", None),
        ("Can you tell if the {c} object is left or right of the {c2} one?", None),
    ),
    "relation_y": (
        ("Does the {c} {s} sit above or below the {c2} {s2}?", AB),
        ("Compared to the {c2} object, is the {c} object higher or lower?", HL),
        ("Is the {c} {s} located over or under the {c2} {s2}?", OU),
        ("Can you tell if the {c} {s} is below or above the {c2} one?", AB),
    ),
    "exists": (
        ("Does a {c} {s} appear in the image?", None),
        ("Is any {c} {s} visible?", None),
        ("Could you check whether the picture contains a {c} {s}?", None),
        ("Is there a {c} {s} in this picture?", None),
    ),
    "caption": (
        ("Describe the picture briefly.", None),
        ("What can you see in this image?", None),
        ("Tell me what the image shows.", None),
        ("Give me a caption for this picture.", None),
        ("Could you describe the image, please?", None),
    ),
}

SETS = {"classic": CLASSIC, "train": TRAIN, "heldout": HELDOUT}
LOWER_SHARE = 0.2  # non-classic questions: lower-cased this often
BARE_SHARE = 0.2  # ... and without their final "?" or "." this often


def surface(text: str, rng: np.random.Generator) -> str:
    """Lower case and/or no final mark, some of the time (the ways people type questions)."""
    if rng.random() < LOWER_SHARE:
        text = text.lower()
    if rng.random() < BARE_SHARE:
        text = text.rstrip("?.")
    return text


# Words `noise` never touches: the options a question offers (its answer repeats one of them).
OPTIONS = frozenset((*AB, *HL, *OU, "left", "right", "top", "bottom"))
NOISE_EDITS = ("replace", "drop", "add")
PUNCT = "?.,:"  # marks a template word may carry at its end


def noise(text: str, rng: np.random.Generator, share: float) -> str:
    """With probability `share`, replace, drop or add one word of a template (never a slot such as
    `{c}`, nor an option word) with a made-up lower-case word of 2-9 letters."""
    if share <= 0 or rng.random() >= share:
        return text
    words = text.split(" ")
    free = [i for i, w in enumerate(words) if "{" not in w and w.strip(PUNCT + "'s").lower() not in OPTIONS]
    edit = NOISE_EDITS[int(rng.integers(len(NOISE_EDITS)))]
    made_up = "".join(chr(97 + int(c)) for c in rng.integers(26, size=int(rng.integers(2, 10))))
    if edit == "add" or not free:
        words.insert(int(rng.integers(len(words) + 1)), made_up)
    else:
        i = free[int(rng.integers(len(free)))]
        tail = words[i][len(words[i].rstrip(PUNCT)) :]  # keep the punctuation the word carried
        if edit == "replace":
            words[i] = made_up + tail
        elif len(words) > 2:
            del words[i]
            if tail and i > 0:
                words[i - 1] += tail
    out = " ".join(words)
    return out[0].upper() + out[1:] if text[:1].isupper() else out
