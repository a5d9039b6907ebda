"""Narration for the synthetic corpus: caption templates, synonyms, filler and mistiming, and SRT text."""

from __future__ import annotations

import numpy as np

from data_prep.synth_classes import SynthClass

COLOUR_WORDS = {
    "red": ("red", "crimson", "scarlet"),
    "blue": ("blue", "navy", "azure"),
    "green": ("green", "emerald", "lime"),
    "yellow": ("yellow", "golden", "lemon"),
    "purple": ("purple", "violet", "lilac"),
    "orange": ("orange", "amber", "tangerine"),
}
SHAPE_WORDS = {
    "circle": ("circle", "ball", "disc", "dot"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "wedge", "pyramid"),
    "diamond": ("diamond", "rhombus", "gem"),
    "ring": ("ring", "hoop", "donut"),
    "cross": ("cross", "plus sign", "x shape"),
}
MOTION_WORDS = {
    "bounce": ("bounces across the screen", "hops along the floor", "bounces to the right", "keeps bouncing"),
    "wallbounce": ("bounces from wall to wall", "ricochets off the sides", "zips back and forth"),
    "rightward": ("slides to the right", "moves from left to right", "glides rightwards"),
    "leftward": ("slides to the left", "moves from right to left", "drifts leftwards"),
    "grow": ("grows bigger", "expands", "swells up", "gets larger and larger"),
    "shrink": ("shrinks", "gets smaller", "shrinks away", "dwindles to a speck"),
    "orbit": ("circles around", "goes round in a loop", "orbits the middle", "spins around clockwise"),
}
TIMBRE_WORDS = {
    "sine": ("whistle", "pure tone", "hum"),
    "square": ("buzz", "buzzy tone"),
    "saw": ("brassy tone", "horn"),
}
RHYTHM_WORDS = {
    "steady": ("steady", "long", "constant"),
    "pulse": ("quick", "pulsing", "rapid"),
    "double": ("double", "two-note", "paired"),
    "sparse": ("slow", "gentle", "lazy"),
}
TEMPLATES = (
    "a {colour} {shape} {motion}",
    "now the {colour} {shape} {motion}",
    "look at the {colour} {shape}, it {motion}",
    "here the {shape} {motion} with a {sound}",
    "you can hear a {sound} while the {colour} {shape} {motion}",
    "the {colour} {shape} {motion} and makes a {sound}",
    "watch this {colour} {shape} as it {motion}",
    "listen to the {sound} as the {shape} {motion}",
    "and here it is again, the {colour} {shape}",
)
FILLERS = (
    "thanks for watching",
    "don't forget to subscribe",
    "let me know in the comments",
    "hi everyone and welcome back",
    "okay so let's see",
    "hit the like button if you enjoyed this",
    "that's all for today",
    "see you in the next one",
    "um where was I",
    "as I said before",
    "link in the description",
    "so yeah",
)
FILLER_RATE = 0.5  # per segment, so about a third of all captions are filler
MISTIME_RATE = 0.25  # narrations shifted by 1.5-3 s: the weak alignment MIL-NCE is for


def _describe(cls: SynthClass, rng: np.random.Generator) -> str:
    def pick(options):
        return options[int(rng.integers(len(options)))]

    pitch = pick(
        ("low", "deep") if cls.pitch_hz < 300 else ("mid", "soft") if cls.pitch_hz < 500 else ("high", "shrill")
    )
    sound = f"{pick(RHYTHM_WORDS[cls.rhythm])} {pitch} {pick(TIMBRE_WORDS[cls.timbre])}"
    colour, shape, motion = COLOUR_WORDS[cls.colour], SHAPE_WORDS[cls.shape], MOTION_WORDS[cls.motion]
    return pick(TEMPLATES).format(colour=pick(colour), shape=pick(shape), motion=pick(motion), sound=sound)


def plan_captions(cls: SynthClass, spans: list[tuple[float, float]], seconds: float, rng) -> list[dict]:
    """One narration per segment (sometimes mistimed), plus filler after about half of them; sorted by start."""
    captions = []
    for k, (start, end) in enumerate(spans):
        split = end if rng.random() >= FILLER_RATE else start + 0.6 * (end - start)
        if split < end:
            captions.append({"start": split, "end": end, "text": str(rng.choice(FILLERS)), "kind": "filler"})
        cap = {"start": start, "end": split, "text": _describe(cls, rng), "kind": "narration", "segment": k}
        if rng.random() < MISTIME_RATE:
            shift, length = rng.uniform(1.5, 3.0) * rng.choice([-1.0, 1.0]), split - start
            for s in (shift, -shift):
                moved = float(np.clip(start + s, 0.0, seconds - length))
                if abs(moved - start) >= 1.0:
                    cap.update(start=moved, end=moved + length, kind="mistimed")
                    break
        captions.append(cap)
    for c in captions:
        c["start"], c["end"] = round(float(c["start"]), 3), round(float(c["end"]), 3)
    return sorted(captions, key=lambda c: (c["start"], c["end"]))


def _srt_time(t: float) -> str:
    ms = int(round(t * 1000))
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


def srt_text(captions: list[dict]) -> str:
    blocks = [
        f"{i}\n{_srt_time(c['start'])} --> {_srt_time(c['end'])}\n{c['text']}\n" for i, c in enumerate(captions, 1)
    ]
    return "\n".join(blocks) + "\n" if blocks else ""
