"""The synthetic corpus's classes: each a shape, a colour and a motion with a sound signature (pitch, timbre,
rhythm). The renderer (`data_prep/synth.py`) and the narration (`data_prep/synth_captions.py`) both read this table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SynthClass:
    """One class of the synthetic corpus; `label` is its name in manifests and `classes.json`."""

    label: str
    shape: str
    colour: str
    motion: str
    pitch_hz: float
    timbre: str
    rhythm: str

    def to_json(self) -> dict:
        sound = {"pitch_hz": self.pitch_hz, "timbre": self.timbre, "rhythm": self.rhythm}
        return {"label": self.label, "shape": self.shape, "colour": self.colour, "motion": self.motion, "sound": sound}


# Factors are shared between classes (two circles, two orbits, ...): a class is a combination, not one cue.
CLASSES = (
    SynthClass("red_circle_bounce", "circle", "red", "bounce", 523.3, "sine", "sparse"),
    SynthClass("blue_square_rightward", "square", "blue", "rightward", 196.0, "square", "pulse"),
    SynthClass("green_triangle_grow", "triangle", "green", "grow", 329.6, "saw", "steady"),
    SynthClass("yellow_diamond_orbit", "diamond", "yellow", "orbit", 392.0, "sine", "double"),
    SynthClass("purple_ring_leftward", "ring", "purple", "leftward", 261.6, "saw", "pulse"),
    SynthClass("orange_cross_shrink", "cross", "orange", "shrink", 659.3, "square", "steady"),
    SynthClass("blue_circle_wallbounce", "circle", "blue", "wallbounce", 293.7, "square", "sparse"),
    SynthClass("green_square_bounce", "square", "green", "bounce", 440.0, "saw", "double"),
    SynthClass("orange_triangle_leftward", "triangle", "orange", "leftward", 784.0, "sine", "steady"),
    SynthClass("yellow_ring_orbit", "ring", "yellow", "orbit", 220.0, "square", "double"),
)
