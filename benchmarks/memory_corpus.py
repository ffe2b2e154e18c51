"""Generated memory entries: the distractors of the relevance set and the bench's corpus.

Sentences like the ones agents write into memory (notes of tasks, observations, decisions,
conversation turns), from templates and word lists, deterministic for a seed.
"""

from __future__ import annotations

import random

_PEOPLE = ("Alice", "Bob", "Chen", "Dana", "Emeka", "Farah", "Gustav", "Hana", "Ivan", "Jo", "Kemal", "Lena")
_THINGS = (
    "the quarterly report",
    "the onboarding guide",
    "the sales dashboard",
    "the inventory sheet",
    "the test plan",
    "the design mockups",
    "the release notes",
    "the customer survey",
    "the training slides",
    "the audit log",
    "the roadmap",
    "the support ticket",
    "the contract draft",
    "the style guide",
    "the data export",
    "the pricing page",
    "the team calendar",
    "the project wiki",
    "the vendor list",
    "the risk register",
)
_ACTIONS = (
    "reviewed",
    "updated",
    "archived",
    "shared",
    "approved",
    "rewrote",
    "translated",
    "summarised",
    "checked",
    "printed",
    "reorganised",
    "commented on",
    "signed off",
    "uploaded",
    "renamed",
    "split up",
)
_PLACES = (
    "Lisbon",
    "Nairobi",
    "Oslo",
    "Lima",
    "Seoul",
    "Denver",
    "Cairo",
    "Perth",
    "Dublin",
    "Quito",
    "Hanoi",
    "Tallinn",
    "Accra",
    "Montreal",
    "Krakow",
    "Osaka",
)
_TOPICS = (
    "hiring",
    "the office move",
    "the holiday party",
    "the new intern",
    "the coffee machine",
    "team lunch",
    "the product demo",
    "the partner workshop",
    "the annual survey",
    "the volunteer day",
    "the book club",
    "the security training",
    "the recycling policy",
    "the parking spaces",
    "the desk booking tool",
)
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "next week", "tomorrow", "in two weeks")
_FEELINGS = ("happy", "worried", "curious", "unsure", "excited", "tired", "pleased", "annoyed")
_TOOLS = ("spreadsheet", "calendar", "notebook", "whiteboard", "chat channel", "shared drive", "ticket queue")
_TEMPLATES = (
    "{person} {action} {thing} on {day}.",
    "Task {n}: {action} {thing} for {person}.",
    "{person} is {feeling} about {topic}.",
    "Note: {person} will travel to {place} {day} to discuss {topic}.",
    "Decided that {person} leads {topic} from {day}.",
    "Observation: {thing} was {action} twice by mistake.",
    "{person} asked whether {thing} could be {action} before {day}.",
    "Feedback from {person}: {topic} went well, but {thing} needs work.",
    "Moved {thing} to the {tool} so {person} can find it.",
    "Conversation with {person} about {topic} and {thing}.",
    "{person} prefers the {tool} over email for {topic}.",
    "Agent completed step {n} of {topic} and {action} {thing}.",
    "Error {n} while {person} {action} {thing}; retried later.",
    "Weather in {place} was mild during {topic}.",
    "{person} and {other} {action} {thing} together in {place}.",
    "Remember to thank {person} for helping with {topic}.",
    "The {tool} for {topic} now lists {n} items.",
    "{person} recommended {place} for {topic} {day}.",
)


def sentences(count: int, seed: int = 7) -> list[str]:
    """``count`` generated memory sentences, the same for the same seed."""
    rng = random.Random(seed)  # noqa: S311 - generated text, not secrets
    out = []
    for _ in range(count):
        template = rng.choice(_TEMPLATES)
        person, other = rng.sample(_PEOPLE, 2)
        out.append(
            template.format(
                person=person,
                other=other,
                thing=rng.choice(_THINGS),
                action=rng.choice(_ACTIONS),
                place=rng.choice(_PLACES),
                topic=rng.choice(_TOPICS),
                day=rng.choice(_DAYS),
                feeling=rng.choice(_FEELINGS),
                tool=rng.choice(_TOOLS),
                n=rng.randrange(1, 10_000),
            )
        )
    return out
