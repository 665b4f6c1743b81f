"""What the trained built-in models can draw: flat shapes in a few named colours
(docs/trained-models.md). A prompt outside that vocabulary ("a pink circle", "a cat") comes back
as a blob, so a job whose prompts go to these models says, in one warning line, how many prompts
fall outside and what the vocabulary is.
"""

from __future__ import annotations

import re

import pyarrow.compute as pc

from pipeline import manifest
from pipeline.spec import JobSpec
from pipeline.training.data import COLOURS, SHAPES

# The built-ins trained on captioned shapes; their prompts are read against the vocabulary.
SHAPE_MODELS = ("builtin:shapes-t2i", "builtin:shapes-sr", "builtin:shapes-inpaint")
# Colour and shape words people write that these models never saw: "a pink circle on a blue
# background" names two known words and still draws a grey blob.
OTHER_COLOURS = ("pink", "grey", "gray", "brown", "cyan", "magenta", "violet", "indigo", "gold", "golden", "silver",
                 "beige", "turquoise", "teal", "navy", "maroon", "lime", "olive", "crimson", "lavender", "tan")
OTHER_SHAPES = ("star", "heart", "hexagon", "pentagon", "octagon", "rectangle", "oval", "ellipse", "rhombus",
                "trapezoid", "crescent", "arrow", "line", "ring", "spiral", "polygon", "sphere", "cube")


def _words(prompt: str) -> set[str]:
    # Plurals ("circles") name the same shape.
    return {w.removesuffix("s") if w.removesuffix("s") in SHAPES + OTHER_SHAPES else w
            for w in re.findall(r"[a-z]+", prompt.lower())}


def outside(prompt: str) -> bool:
    """Whether ``prompt`` names no colour or shape the models know, or one they do not."""
    words = _words(prompt)
    known = words & set(COLOURS + SHAPES)
    return not known or bool(words & set(OTHER_COLOURS + OTHER_SHAPES))


def warning(spec: JobSpec) -> str | None:
    """One line for the job: how many of the prompts that go to a shape model are outside its
    vocabulary, with an example and the vocabulary; None when all are inside (or none goes there)."""
    flows = {name: [s.model for s in flow if s.model in SHAPE_MODELS] for name, flow in spec.flow_map().items()}
    if not any(flows.values()):
        return None
    table = manifest.read(spec, ["prompt", "task"])
    if "prompt" not in table.column_names:
        return None
    if spec.flows is not None and "task" in table.column_names:
        table = table.filter(pc.is_in(table.column("task"), value_set=pc.cast([n for n, m in flows.items() if m],
                                                                               "string")))
    # An empty prompt is a request for no particular picture (super-resolution takes one).
    prompts = [p for p in table.column("prompt").to_pylist() if p and p.strip()]
    bad = [p for p in prompts if outside(p)]
    if not bad:
        return None
    models = sorted({m for ms in flows.values() for m in ms})
    return (f"shardgen: warning: {len(bad)} of {len(prompts)} prompts name no colour or shape that "
            f"{', '.join(models)} {'was' if len(models) == 1 else 'were'} trained on, or one they were not "
            f"(e.g. {bad[0]!r}); such prompts come out as blobs. Known colours: {', '.join(COLOURS)}; "
            f"shapes: {', '.join(SHAPES)} (docs/trained-models.md)")
