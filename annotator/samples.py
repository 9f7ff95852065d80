"""Built-in sample pairs for ``annotator bench``: a local speed check that needs no server and no data.

Written for this project (no external data): each query has one document that answers it and three that
do not, some on the same topic. Shuffled on purpose, as kombinat's hardest-first order interleaves queries,
so the benchmark also exercises the query grouping.
"""

from __future__ import annotations

import random

from annotator.backends.base import Pair

_SAMPLES: dict[str, tuple[str, list[str]]] = {
    "how long should eggs be boiled for a soft yolk": (
        "For a soft, runny yolk, lower the eggs into boiling water and cook them for six to seven minutes, "
        "then cool them briefly in cold water before peeling.",
        [
            "Hens lay more eggs in spring and summer because laying is triggered by longer daylight hours.",
            "Egg cartons carry a best-before date; eggs kept in the fridge usually stay fresh for weeks.",
            "A pressure cooker can make rice in a fraction of the time needed on the stove.",
        ],
    ),
    "what causes the seasons on earth": (
        "Seasons happen because Earth's axis is tilted about 23.5 degrees, so each hemisphere receives more "
        "direct sunlight for part of the year and less for the rest.",
        [
            "The Moon's gravity raises two tidal bulges, which is why most coasts see two high tides a day.",
            "Earth's orbit is slightly elliptical, but its distance to the Sun changes by only ~3 percent.",
            "Weather forecasts use numerical models that divide the atmosphere into a 3D grid.",
        ],
    ),
    "python remove duplicates from a list keeping order": (
        "To drop duplicates while keeping the first occurrence of each item, use list(dict.fromkeys(items)): "
        "dictionaries preserve insertion order since Python 3.7.",
        [
            "A Python set is an unordered collection of unique, hashable elements.",
            "The sort method of a list sorts it in place and returns None.",
            "List comprehensions build a new list by applying an expression to each item of an iterable.",
        ],
    ),
    "symptoms of vitamin d deficiency": (
        "Vitamin D deficiency often causes fatigue, bone pain, muscle weakness and aches, and in children it "
        "can lead to rickets, a softening of the bones.",
        [
            "Vitamin C is found in citrus fruit, peppers and strawberries.",
            "The skin produces vitamin D when it is exposed to ultraviolet B light from the sun.",
            "Iron-deficiency anaemia is the most common nutritional deficiency worldwide.",
        ],
    ),
    "who painted the ceiling of the sistine chapel": (
        "Michelangelo painted the Sistine Chapel ceiling between 1508 and 1512, for Pope Julius II.",
        [
            "The Sistine Chapel is where the conclave meets to elect a new pope.",
            "Leonardo da Vinci painted the Last Supper on a wall of a convent refectory in Milan.",
            "Fresco painting applies pigment to wet lime plaster so that it binds as the plaster dries.",
        ],
    ),
    "how does a heat pump heat a house in winter": (
        "A heat pump moves heat rather than making it: its refrigerant absorbs heat from outdoor air "
        "even when it is cold, a compressor raises its temperature, and the heat is released indoors.",
        [
            "Double glazing reduces heat loss through windows by trapping a layer of gas between two panes.",
            "Gas boilers burn natural gas to heat water that circulates through radiators.",
            "Solar panels convert sunlight directly into electricity using photovoltaic cells.",
        ],
    ),
    "capital of australia": (
        "Canberra is the capital city of Australia; it was purpose-built and became the seat of government in 1927.",
        [
            "Sydney is Australia's largest city and is known for its harbour and opera house.",
            "Australia is both a country and a continent, and it has six states.",
            "The Great Barrier Reef lies off the coast of Queensland.",
        ],
    ),
    "why is the sky blue": (
        "The sky looks blue because air molecules scatter short blue wavelengths of sunlight much more "
        "strongly than red ones, an effect known as Rayleigh scattering.",
        [
            "Sunsets look red and orange because sunlight passes through more atmosphere near the horizon.",
            "Clouds are made of tiny water droplets or ice crystals suspended in the air.",
            "The ozone layer absorbs most of the Sun's ultraviolet radiation.",
        ],
    ),
}


def sample_pairs(seed: int = 0) -> list[tuple[Pair, bool]]:
    """(pair, is_relevant) for every built-in sample, in a shuffled (interleaved) order."""
    items: list[tuple[Pair, bool]] = []
    for qi, (query, (positive, negatives)) in enumerate(_SAMPLES.items()):
        items.append((Pair(f"sample-{qi}-0", query, positive), True))
        items.extend((Pair(f"sample-{qi}-{di + 1}", query, doc), False) for di, doc in enumerate(negatives))
    random.Random(seed).shuffle(items)
    return items
