"""The demo's task: route shipping tickets, a DSPy program with two predictors.

A customer message mentions the city a parcel is stuck in. The program first extracts
the city (`extract`), then names the country that city is in (`locate`). The metric asks
for the right country. The dataset is synthetic and deterministic: messages are built
from templates, names and order numbers by a seeded generator, so the trainset and the
valset never share a message.

The scripted teacher (`teacher_script`) stands in for a large model: it reads the fields
DSPy's ChatAdapter wrote into the prompt and answers in the same format, over the same
HTTP path a hosted model takes. It is not a language model. To make the metric's filter
matter, it gets a fixed share of answers wrong (`TEACHER_ERROR_RATE`), decided by a hash of
the input so every run agrees.
"""

from __future__ import annotations

import hashlib
import random

import dspy

CITIES: dict[str, str] = {
    "Lyon": "France", "Marseille": "France", "Munich": "Germany", "Hamburg": "Germany",
    "Milan": "Italy", "Naples": "Italy", "Seville": "Spain", "Valencia": "Spain",
    "Porto": "Portugal", "Braga": "Portugal", "Krakow": "Poland", "Gdansk": "Poland",
    "Osaka": "Japan", "Kyoto": "Japan", "Toronto": "Canada", "Calgary": "Canada",
}
"""Every city the messages mention, and its country (eight countries, two cities each)."""

NAMES = ["Ana", "Ben", "Chloe", "Dev", "Elif", "Femi", "Gus", "Hana", "Ivo", "June", "Kai", "Lena",
         "Mo", "Nora", "Omar", "Pia", "Quinn", "Rui", "Sara", "Tom", "Uma", "Vik", "Wen", "Yara", "Zoe"]
ITEMS = ["lamp", "chair", "kettle", "bike", "desk", "rug", "camera", "guitar", "blender", "tent",
         "printer", "mirror", "sofa", "heater", "scooter", "speaker"]
TEMPLATES = [
    "Hi, {name} here. My {item} (order {order}) has been stuck in {city} for a week.",
    "Order {order}: the {item} never left the depot in {city}. Can you help? - {name}",
    "Hello, tracking for my {item} says {city} since Monday. Order {order}, thanks, {name}",
    "{name} writing: parcel {order} with a {item} is waiting at customs in {city}.",
    "Where is my {item}? Order {order} shows a delay in {city}. Regards, {name}",
    "My {item} is held in {city}, order number {order}. Please advise. {name}",
]

TEACHER_ERROR_RATE = 0.06
"""Share of inputs the scripted teacher answers wrongly (a stand-in for a large model's mistakes)."""


class ExtractCity(dspy.Signature):
    """Extract the city where the customer's parcel is stuck."""

    message: str = dspy.InputField()
    city: str = dspy.OutputField()


class LocateCity(dspy.Signature):
    """Name the country the city is in."""

    city: str = dspy.InputField()
    country: str = dspy.OutputField()


class ShippingRouter(dspy.Module):
    """Routes a shipping ticket to a country desk: extract the city, then locate its country."""

    def __init__(self):
        super().__init__()
        self.extract = dspy.Predict(ExtractCity)
        self.locate = dspy.Predict(LocateCity)

    def forward(self, message: str):
        city = self.extract(message=message).city
        country = self.locate(city=city).country
        return dspy.Prediction(city=city, country=country)


def metric(example: dspy.Example, prediction: dspy.Prediction, trace=None) -> bool:
    """Right country (case and surrounding space ignored)."""
    return str(prediction.country).strip().lower() == example.country.lower()


def make_examples(n: int, seed: int, order_start: int) -> list[dspy.Example]:
    """`n` tickets; order numbers start at `order_start`, so disjoint ranges give disjoint messages."""
    rng = random.Random(seed)
    cities = sorted(CITIES)
    examples = []
    for i in range(n):
        city = cities[rng.randrange(len(cities))]
        message = rng.choice(TEMPLATES).format(name=rng.choice(NAMES), item=rng.choice(ITEMS),
                                               order=order_start + i, city=city)
        examples.append(dspy.Example(message=message, city=city, country=CITIES[city]).with_inputs("message"))
    return examples


def make_datasets(train_size: int = 500, val_size: int = 200, seed: int = 0) -> tuple[list, list]:
    """The demo's trainset and valset (orders 10000+ and 90000+: no message is in both)."""
    if train_size > 80000 - 10000:
        raise ValueError("train_size: at most 70000 (order numbers of the valset start at 90000).")
    return make_examples(train_size, seed, 10000), make_examples(val_size, seed + 1, 90000)


def _wrong(value: str) -> bool:
    digest = hashlib.sha256(value.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < TEACHER_ERROR_RATE


def teacher_script(inputs: dict[str, str], outputs: list[str]) -> dict[str, str]:
    """The scripted teacher: finds the city in the message, or the city's country.

    About `TEACHER_ERROR_RATE` of messages get a city of another country, so a wrong country
    follows and the metric drops that trace.
    """
    cities = sorted(CITIES)
    if "message" in inputs:
        message = inputs["message"]
        found = next((c for c in cities if c in message), "unknown")
        if found != "unknown" and _wrong(message):
            i = cities.index(found)
            found = next(c for c in cities[i + 1:] + cities[:i] if CITIES[c] != CITIES[found])
        return {"city": found}
    city = inputs.get("city", "").strip()
    return {"country": CITIES.get(city, "unknown")}


def demo_trainset() -> list[dspy.Example]:
    """The demo's 500 training tickets (for job configs: `trainset: bootfinetune.demo.task:demo_trainset`)."""
    return make_datasets()[0]


def demo_valset() -> list[dspy.Example]:
    """The demo's 200 validation tickets."""
    return make_datasets()[1]
