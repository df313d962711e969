"""Generate the retrieval-QA example: documents and train/eval/test rows about an invented archipelago.

Everything here is fiction (the Marrowind Archipelago, its towns, firms, people and dates), so no pretrained
model knows the answers and a fine-tuned model can only get them from the passages or from training.

    python examples/rqa/make_data.py            # writes next to this file
    python examples/rqa/make_data.py --out DIR

Outputs: documents.jsonl (page_content/fmt_content/metadata records), documents.pkl (the same records as a
LocalRQA-style pickle of `local_rqa.schema.document.Document` objects), train_w_qa.jsonl, eval_w_qa.jsonl,
test_w_qa.jsonl. Deterministic: the same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import pickle
import random
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

SEED = 20240605
SOURCE_ROOT = "https://wiki.marrowind.example/"
TRAIN_PARAPHRASES = 3  # questions per fact in the training split
N_EVAL, N_TEST = 30, 40  # facts asked once (with an unseen paraphrase) in eval and test

# Relation -> (question templates, answer template). Eight phrasings each, so train, eval and test can use
# disjoint wordings of the same fact.
RELATIONS: dict[str, tuple[list[str], str]] = {
    "founded": (
        [
            "When was {e} founded?",
            "In what year was {e} founded?",
            "What year was {e} established?",
            "Which year saw the founding of {e}?",
            "When did {e} get its start?",
            "What is the founding year of {e}?",
            "{e} was founded in which year?",
            "How far back does {e} go - when was it founded?",
        ],
        "{e} was founded in {v}.",
    ),
    "founder": (
        [
            "Who founded {e}?",
            "Who was the founder of {e}?",
            "Who started {e}?",
            "Which person established {e}?",
            "Who set up {e}?",
            "Can you tell me who founded {e}?",
            "Name the founder of {e}.",
            "Whose work was the founding of {e}?",
        ],
        "{e} was founded by {v}.",
    ),
    "hq": (
        [
            "Where is {e} headquartered?",
            "In which town is {e} based?",
            "Where are the headquarters of {e}?",
            "Which town is home to the head office of {e}?",
            "Where does {e} have its main office?",
            "Where is the head office of {e} located?",
            "{e} is headquartered in which town?",
            "In what town would I find the headquarters of {e}?",
        ],
        "{e} is headquartered in {v}.",
    ),
    "island": (
        [
            "On which island is {e}?",
            "Which island is {e} located on?",
            "What island would I visit to see {e}?",
            "{e} lies on which island?",
            "Which island is home to {e}?",
            "On what island can {e} be found?",
            "Tell me which island {e} is on.",
            "Where in the archipelago is {e}, island-wise?",
        ],
        "{e} is on {v}.",
    ),
    "population": (
        [
            "What is the population of {e}?",
            "How many people live in {e}?",
            "How many residents does {e} have?",
            "What is the number of inhabitants of {e}?",
            "How populous is {e}?",
            "How many people call {e} home?",
            "What population does {e} have?",
            "How large is the population of {e}?",
        ],
        "{e} has a population of {v}.",
    ),
    "area": (
        [
            "How big is {e}?",
            "What is the area of {e}?",
            "How many square kilometres does {e} cover?",
            "What is the land area of {e}?",
            "How large is {e} in square kilometres?",
            "What area does {e} cover?",
            "Can you tell me the size of {e}?",
            "{e} covers how much land?",
        ],
        "{e} covers {v} square kilometres.",
    ),
    "height": (
        [
            "How tall is {e}?",
            "What is the height of {e}?",
            "How high is {e}?",
            "How many metres tall is {e}?",
            "What height does {e} reach?",
            "How high does {e} rise?",
            "Can you tell me the height of {e}?",
            "{e} is how many metres high?",
        ],
        "{e} is {v} metres tall.",
    ),
    "length": (
        [
            "How long is {e}?",
            "What is the length of {e}?",
            "How many kilometres long is {e}?",
            "What length does {e} have?",
            "Can you tell me how long {e} is?",
            "{e} is how long?",
            "How far does {e} stretch?",
            "What is the total length of {e}?",
        ],
        "{e} is {v} long.",
    ),
    "product": (
        [
            "What does {e} make?",
            "What is {e} best known for making?",
            "Which product is {e} famous for?",
            "What does {e} manufacture?",
            "What is the main product of {e}?",
            "What product is {e} known for?",
            "What does {e} produce?",
            "Tell me what {e} makes.",
        ],
        "{e} is best known for making {v}.",
    ),
    "inventor": (
        [
            "Who invented {e}?",
            "Who designed {e}?",
            "Who is the inventor of {e}?",
            "Who came up with {e}?",
            "Who created {e}?",
            "Whose invention is {e}?",
            "Name the inventor of {e}.",
            "Who was behind the invention of {e}?",
        ],
        "{e} was invented by {v}.",
    ),
    "invented": (
        [
            "When was {e} invented?",
            "In what year was {e} invented?",
            "What year did {e} first appear?",
            "When did {e} come into existence?",
            "Which year was {e} invented in?",
            "What is the year of invention of {e}?",
            "{e} was invented in which year?",
            "How old is the design of {e} - when was it invented?",
        ],
        "{e} was invented in {v}.",
    ),
    "month": (
        [
            "When is {e} held?",
            "In which month does {e} take place?",
            "What month is {e} celebrated in?",
            "When does {e} happen each year?",
            "During which month is {e} held?",
            "What time of year is {e}?",
            "When can I attend {e}?",
            "{e} takes place in which month?",
        ],
        "{e} is held every {v}.",
    ),
    "leader": (
        [
            "Who leads {e}?",
            "Who is the head of {e}?",
            "Who is in charge of {e}?",
            "Who currently runs {e}?",
            "Who heads {e}?",
            "Who is the leader of {e}?",
            "Who directs {e}?",
            "Which person leads {e}?",
        ],
        "{e} is led by {v}.",
    ),
    "employees": (
        [
            "How many people work at {e}?",
            "How many employees does {e} have?",
            "What is the size of the workforce at {e}?",
            "How many staff does {e} employ?",
            "How big is the staff of {e}?",
            "What is the headcount at {e}?",
            "How many workers does {e} have?",
            "{e} employs how many people?",
        ],
        "{e} employs {v} people.",
    ),
    "opened": (
        [
            "When did {e} open?",
            "In what year did {e} open?",
            "What year was {e} opened?",
            "When did {e} first open to the public?",
            "Which year did {e} open?",
            "What is the opening year of {e}?",
            "{e} opened in which year?",
            "Since when has {e} been open?",
        ],
        "{e} opened in {v}.",
    ),
    "born": (
        [
            "When was {e} born?",
            "In what year was {e} born?",
            "What is the birth year of {e}?",
            "What year was {e} born in?",
            "Which year was {e} born?",
            "{e} was born in which year?",
            "Tell me the year {e} was born.",
            "When is {e}'s year of birth?",
        ],
        "{e} was born in {v}.",
    ),
    "birthplace": (
        [
            "Where was {e} born?",
            "What is the birthplace of {e}?",
            "In which town was {e} born?",
            "Which town is {e} from?",
            "Where does {e} come from?",
            "What town was {e} born in?",
            "Where is the hometown of {e}?",
            "{e} was born where?",
        ],
        "{e} was born in {v}.",
    ),
}


@dataclass
class Fact:
    relation: str  # a RELATIONS key, or "custom"
    value: str = ""
    questions: list[str] = field(default_factory=list)  # custom facts only
    answer: str = ""  # custom facts only


@dataclass
class Entity:
    name: str
    intro: str  # descriptive prose that is not asked about
    facts: list[Fact]
    outro: str = ""


def F(relation: str, value: str) -> Fact:
    return Fact(relation, value)


def C(answer: str, *questions: str) -> Fact:
    return Fact("custom", questions=list(questions), answer=answer)


ENTITIES: list[Entity] = [
    Entity(
        "The Marrowind Archipelago",
        "The Marrowind Archipelago is a chain of islands in the cold northern Sorrel Sea, reached by ferry from the "
        "mainland port of Dunmere.",
        [
            C(
                "The Marrowind Archipelago has 23 islands, of which six are inhabited.",
                "How many islands make up the Marrowind Archipelago?",
                "How many islands are in the Marrowind Archipelago?",
                "What is the number of islands in the Marrowind Archipelago?",
                "Of how many islands does the Marrowind Archipelago consist?",
                "Count the islands of the Marrowind Archipelago for me.",
                "How many islands does the Marrowind chain have?",
            ),
            C(
                "The capital of the Marrowind Archipelago is Port Kellimar.",
                "What is the capital of the Marrowind Archipelago?",
                "Which town is the capital of the Marrowind Archipelago?",
                "Where is the seat of government of the Marrowind Archipelago?",
                "Name the capital of the Marrowind islands.",
                "What town serves as the Marrowind capital?",
                "Which settlement is the capital of Marrowind?",
            ),
        ],
        "Its islanders speak a dialect known locally as Brannish.",
    ),
    Entity(
        "The Marrowind drift",
        "Coins and notes in the archipelago are issued by Corrowin Bank.",
        [
            C(
                "The currency of the Marrowind Archipelago is the drift, divided into 40 pennets.",
                "What currency is used in the Marrowind Archipelago?",
                "What money do people use in Marrowind?",
                "What is the Marrowind currency called?",
                "Which currency would I need on the Marrowind islands?",
                "What do islanders in Marrowind pay with?",
                "What is the name of the Marrowind Archipelago's currency?",
            ),
            C(
                "The drift was introduced in 1822, replacing the old salt-token.",
                "When was the drift introduced?",
                "In what year did the Marrowind drift come into use?",
                "What year was the drift currency introduced?",
                "When did Marrowind start using the drift?",
                "Since what year has the drift been the Marrowind currency?",
                "Which year saw the introduction of the drift?",
            ),
        ],
    ),
    Entity(
        "Quorravel",
        "Quorravel is the largest island of the Marrowind Archipelago, with a rugged volcanic interior.",
        [F("population", "52,800"), F("area", "412")],
        "Its north coast is lined with basalt cliffs.",
    ),
    Entity(
        "Imbrisk",
        "Imbrisk is a low, marshy island known for its kelp beds and eel ponds.",
        [F("population", "14,300"), F("area", "186")],
    ),
    Entity(
        "Solvane Key",
        "Solvane Key is a sandy island on the southern edge of the archipelago.",
        [F("population", "6,120"), F("area", "74")],
        "Its beaches draw most of the archipelago's summer visitors.",
    ),
    Entity(
        "Thessary Rock",
        "Thessary Rock is a steep granite island at the western end of the chain.",
        [F("population", "2,480"), F("area", "39")],
    ),
    Entity(
        "Oduin Cay",
        "Oduin Cay is a small coral island sheltered by a horseshoe reef.",
        [F("population", "1,940"), F("area", "22")],
    ),
    Entity(
        "Little Brannock",
        "Little Brannock is the most remote inhabited island of the archipelago, home to a large seabird colony.",
        [F("population", "310"), F("area", "9")],
    ),
    Entity(
        "Port Kellimar",
        "Port Kellimar is the capital and chief harbour of the Marrowind Archipelago.",
        [F("island", "Quorravel"), F("population", "41,200"), F("founded", "1712")],
        "Its old town is built around a stone quay called the Long Step.",
    ),
    Entity(
        "Vessa Hollow",
        "Vessa Hollow is a market town surrounded by kelp drying fields.",
        [F("island", "Imbrisk"), F("population", "8,950")],
    ),
    Entity(
        "Brightwater Landing",
        "Brightwater Landing is the ferry town of the southern islands.",
        [F("island", "Solvane Key"), F("founded", "1804")],
    ),
    Entity(
        "Gannet's Reach",
        "Gannet's Reach is a fishing village beneath the cliffs of Quorravel's north coast.",
        [F("population", "3,310")],
    ),
    Entity(
        "Ostry Mill",
        "Ostry Mill is a former quarry town that grew around a tidal mill.",
        [F("island", "Thessary Rock"), F("founded", "1861")],
    ),
    Entity(
        "Calder's Ferry",
        "Calder's Ferry is a village of pastel houses facing the reef.",
        [F("island", "Oduin Cay"), F("population", "1,275")],
    ),
    Entity(
        "Nimmerton",
        "Nimmerton is the oldest inland settlement on Imbrisk.",
        [F("founded", "1779")],
        "Its weekly eel market has run without a break since its first year.",
    ),
    Entity(
        "Halvercrest Shipping Company",
        "Halvercrest Shipping Company runs the cargo routes between the archipelago and the mainland.",
        [F("founded", "1838"), F("founder", "Ottoline Halver"), F("hq", "Port Kellimar")],
    ),
    Entity(
        "Lumeria Kelp Works",
        "Lumeria Kelp Works is the largest employer on Imbrisk.",
        [F("product", "kelpbrick building blocks"), F("hq", "Vessa Hollow"), F("employees", "640")],
    ),
    Entity(
        "Orrin & Daughters Lanternmakers",
        "Orrin & Daughters Lanternmakers is a family workshop that still hand-blows its glass.",
        [F("product", "the Moonjar lantern"), F("founded", "1867")],
    ),
    Entity(
        "Saltglass Telegraph Company",
        "Saltglass Telegraph Company laid the first undersea cable between the islands.",
        [F("founded", "1879"), F("leader", "Tobias Wren-Allard")],
    ),
    Entity(
        "Pellucid Ferries",
        "Pellucid Ferries operates the passenger boats that link all six inhabited islands.",
        [F("hq", "Brightwater Landing"), F("employees", "212")],
    ),
    Entity(
        "Greyhaven Cannery",
        "Greyhaven Cannery stands on the quay at Gannet's Reach.",
        [F("founded", "1902"), F("product", "smoked marrow-eel in tins")],
    ),
    Entity(
        "Thorncastle Instruments",
        "Thorncastle Instruments builds navigation and radio equipment for small boats.",
        [F("product", "the Skerry-7 radio receiver"), F("founder", "Idris Pemberwick")],
    ),
    Entity(
        "Corrowin Bank",
        "Corrowin Bank is the archipelago's central bank and issues the drift.",
        [F("founded", "1821"), F("leader", "Aurelie Stross")],
    ),
    Entity(
        "The Tidewhistle foghorn",
        "The Tidewhistle foghorn is a compressed-air horn audible eleven kilometres out to sea.",
        [F("inventor", "Marisol Ventrebb"), F("invented", "1896")],
    ),
    Entity(
        "Kelpbrick",
        "Kelpbrick is a pressed building block made from dried kelp and lime.",
        [F("inventor", "Dagny Oulette"), F("invented", "1931")],
        "Most houses built on Imbrisk since the 1950s use it.",
    ),
    Entity(
        "The Moonjar lantern",
        "The Moonjar lantern is a storm lantern with a double glass chimney.",
        [F("inventor", "Perrin Orrin"), F("invented", "1872")],
    ),
    Entity(
        "The Skerry-7 radio receiver",
        "The Skerry-7 radio receiver is a waterproof set used on most Marrowind fishing boats.",
        [F("invented", "1948")],
    ),
    Entity(
        "Anselm Quaye",
        "Anselm Quaye is the current Governor of the Marrowind Archipelago.",
        [
            F("born", "1941"),
            F("birthplace", "Nimmerton"),
            C(
                "Anselm Quaye became Governor of the Marrowind Archipelago in 1998.",
                "When did Anselm Quaye become Governor?",
                "In what year did Anselm Quaye take office as Governor?",
                "Since when has Anselm Quaye been Governor of Marrowind?",
                "What year did Anselm Quaye start his term as Governor?",
                "When was Anselm Quaye first made Governor of the archipelago?",
                "Which year did Anselm Quaye become the Marrowind Governor?",
            ),
        ],
    ),
    Entity(
        "Marisol Ventrebb",
        "Marisol Ventrebb was an engineer who worked on lighthouse signals.",
        [F("born", "1864"), F("birthplace", "Ostry Mill")],
    ),
    Entity(
        "Ilka Dorran",
        "Ilka Dorran was the archipelago's best-known poet.",
        [
            F("born", "1903"),
            F("birthplace", "Calder's Ferry"),
            C(
                "Ilka Dorran's most famous work is the poem cycle The Salt Ledger.",
                "What is Ilka Dorran's most famous work?",
                "Which poem cycle is Ilka Dorran best known for?",
                "What did Ilka Dorran write that made her famous?",
                "Name Ilka Dorran's best-known book of poems.",
                "What is the title of Ilka Dorran's most celebrated work?",
                "Which work is Ilka Dorran remembered for?",
            ),
        ],
    ),
    Entity(
        "Ottoline Halver",
        "Ottoline Halver was a ship owner and merchant.",
        [F("born", "1801")],
    ),
    Entity(
        "Idris Pemberwick",
        "Idris Pemberwick was a radio engineer and amateur astronomer.",
        [F("born", "1912"), F("birthplace", "Gannet's Reach")],
    ),
    Entity(
        "Dagny Oulette",
        "Dagny Oulette was a chemist who studied seaweed.",
        [F("born", "1889")],
    ),
    Entity(
        "Corvish Lighthouse",
        "Corvish Lighthouse guards the western approach to the archipelago.",
        [F("opened", "1851"), F("height", "47"), F("island", "Thessary Rock")],
        "Its lamp flashes green every nine seconds.",
    ),
    Entity(
        "Mount Ebbenfell",
        "Mount Ebbenfell is a dormant volcano whose last eruption was recorded in 1655.",
        [F("height", "1,284"), F("island", "Quorravel")],
    ),
    Entity(
        "Saltglass Bridge",
        "Saltglass Bridge carries the coast road between Quorravel and Imbrisk.",
        [F("length", "3.4 kilometres"), F("opened", "1927")],
    ),
    Entity(
        "Imbrisk Tunnel",
        "Imbrisk Tunnel carries the island railway under the Nimmer Hills.",
        [F("length", "2.1 kilometres"), F("opened", "1966")],
    ),
    Entity(
        "Kellimar Observatory",
        "Kellimar Observatory sits on a ridge above Port Kellimar.",
        [F("opened", "1889"), F("leader", "Dr. Hesper Vane")],
    ),
    Entity(
        "Marrowind Maritime Museum",
        "Marrowind Maritime Museum displays ship models, charts and the wreck of the schooner Gull's Oath.",
        [F("opened", "1958"), F("island", "Solvane Key")],
    ),
    Entity(
        "Oduin Botanical Garden",
        "Oduin Botanical Garden grows plants from every island of the chain.",
        [F("founded", "1911"), F("founder", "Cressida Lowmoor")],
    ),
    Entity(
        "The University of Port Kellimar",
        "The University of Port Kellimar is the only university in the archipelago.",
        [F("founded", "1846"), F("leader", "Chancellor Maud Errington")],
    ),
    Entity(
        "Kellimar Harbour Authority",
        "Kellimar Harbour Authority manages the piers, pilots and tugs of the capital's harbour.",
        [F("employees", "1,140")],
    ),
    Entity(
        "The Festival of Drowned Bells",
        "The Festival of Drowned Bells remembers the church bells lost when Old Kellimar sank.",
        [F("month", "October"), F("founded", "1794")],
    ),
    Entity(
        "The Kelp Harvest Regatta",
        "The Kelp Harvest Regatta is a race of flat-bottomed kelp boats around Imbrisk.",
        [F("month", "June")],
    ),
    Entity(
        "Lantern Night",
        "Lantern Night is when every household sets a lantern on its window sill.",
        [F("month", "December")],
    ),
    Entity(
        "The Great Squall of 1893",
        "The Great Squall of 1893 was the worst storm in the archipelago's recorded history.",
        [
            C(
                "The Great Squall of 1893 sank 37 ships.",
                "How many ships were lost in the Great Squall of 1893?",
                "How many vessels sank during the Great Squall?",
                "What was the number of ships sunk by the Great Squall of 1893?",
                "How many boats did the Great Squall of 1893 destroy?",
                "Tell me how many ships went down in the Great Squall.",
                "The Great Squall of 1893 sank how many ships?",
            )
        ],
    ),
    Entity(
        "The silver-tailed marrow fox",
        "The silver-tailed marrow fox is a small fox found only on Quorravel and Imbrisk.",
        [
            C(
                "The silver-tailed marrow fox lives for about 9 years in the wild.",
                "How long does the silver-tailed marrow fox live?",
                "What is the lifespan of the silver-tailed marrow fox?",
                "How many years does a silver-tailed marrow fox live in the wild?",
                "What is the typical life expectancy of the silver-tailed marrow fox?",
                "How old do silver-tailed marrow foxes get?",
                "For how long does a wild silver-tailed marrow fox usually live?",
            )
        ],
    ),
    Entity(
        "The spindle palm",
        "The spindle palm is a slender palm that grows on the sheltered side of Oduin Cay.",
        [F("height", "18")],
    ),
    Entity(
        "The Brannock puffin",
        "The Brannock puffin nests in burrows on the cliffs of Little Brannock.",
        [
            C(
                "About 12,000 pairs of Brannock puffins nest on Little Brannock.",
                "How many Brannock puffins nest on Little Brannock?",
                "How many pairs of Brannock puffins breed on Little Brannock?",
                "What is the size of the Brannock puffin colony?",
                "How big is the Brannock puffin breeding population?",
                "How many puffin pairs are there on Little Brannock?",
                "What number of Brannock puffin pairs nest on the island?",
            )
        ],
    ),
    Entity(
        "Kellimar chowder",
        "Kellimar chowder is the archipelago's national dish, served with oat bread.",
        [
            C(
                "The main ingredient of Kellimar chowder is smoked marrow-eel.",
                "What is the main ingredient of Kellimar chowder?",
                "What is Kellimar chowder made from?",
                "Which fish goes into Kellimar chowder?",
                "What is the key ingredient in Kellimar chowder?",
                "What gives Kellimar chowder its main flavour?",
                "Kellimar chowder is mostly made of what?",
            )
        ],
    ),
]


def slug(name: str) -> str:
    keep = "".join(c.lower() if c.isalnum() else "-" for c in name.removeprefix("The "))
    return "-".join(p for p in keep.split("-") if p)


def fact_text(entity: Entity, fact: Fact) -> tuple[list[str], str]:
    """The question phrasings and the one-sentence answer of a fact."""
    if fact.relation == "custom":
        return fact.questions, fact.answer
    questions, answer = RELATIONS[fact.relation]
    # "The X" reads "the X" mid-sentence; the sentence's first letter is capitalised afterwards.
    e = "the " + entity.name[4:] if entity.name.startswith("The ") else entity.name
    return [_cap(q.format(e=e)) for q in questions], _cap(answer.format(e=e, v=fact.value))


def _cap(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


def build_documents() -> tuple[list[dict], list[list[tuple[list[str], str]]]]:
    """One passage per entity; the fact sentences appear verbatim in it, between the intro and the outro."""
    docs, facts = [], []
    for ent in ENTITIES:
        texts = [fact_text(ent, f) for f in ent.facts]
        sentences = [ent.intro] + [a for _, a in texts] + ([ent.outro] if ent.outro else [])
        content = " ".join(sentences)
        title = ent.name.removeprefix("The ")
        meta = {"source": SOURCE_ROOT + slug(ent.name), "title": title}
        fmt = f"Source: {meta['source']}\nTitle: {title}\nContent:\n{content}"
        docs.append({"page_content": content, "fmt_content": fmt, "metadata": meta})
        facts.append(texts)
    return docs, facts


def make_rows(docs: list[dict], facts: list[list[tuple[list[str], str]]], rng: random.Random):
    all_facts = [(i, q, a) for i, fs in enumerate(facts) for q, a in fs]
    shuffled = {}
    for n, (_, qs, _) in enumerate(all_facts):
        order = list(qs)
        rng.shuffle(order)
        shuffled[n] = order
    eval_ids = set(rng.sample(range(len(all_facts)), N_EVAL))
    test_ids = set(rng.sample(range(len(all_facts)), N_TEST))

    def row(n: int, question: str, with_history: bool) -> dict:
        doc_i, _, answer = all_facts[n]
        others = [j for j in range(len(docs)) if j != doc_i]
        history = []
        if with_history:
            # An earlier turn about another fact; its passage is recorded as that turn's source.
            m = rng.choice([k for k in range(len(all_facts)) if k != n])
            prev_doc, _, prev_answer = all_facts[m]
            history = [
                {"speaker": "user", "message": shuffled[m][0], "source_documents": []},
                {"speaker": "assistant", "message": prev_answer, "source_documents": [docs[prev_doc]]},
            ]
        return {
            "chat_history": history,
            "question": question,
            "gold_docs": [docs[doc_i]],
            "hard_neg_docs": [docs[rng.choice(others)]],
            "gold_answer": answer,
        }

    train, evals, tests = [], [], []
    for n in range(len(all_facts)):
        qs = shuffled[n]
        for q in qs[:TRAIN_PARAPHRASES]:
            train.append(row(n, q, rng.random() < 0.08))
        # Eval and test wordings are never used in training (and differ from each other).
        if n in eval_ids:
            evals.append(row(n, qs[TRAIN_PARAPHRASES], rng.random() < 0.1))
        if n in test_ids:
            tests.append(row(n, qs[TRAIN_PARAPHRASES + 1], rng.random() < 0.1))
    rng.shuffle(train)
    return train, evals, tests


def write_jsonl(rows: list[dict], path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_localrqa_pickle(docs: list[dict], path: Path) -> None:
    """Pickle the documents the way LocalRQA does: a list of `local_rqa.schema.document.Document` dataclasses.

    LocalRQA isn't a dependency, so an equivalent dataclass is registered under that module path just for
    pickling; sftlab reads it back with its restricted unpickler, never importing that module.
    """
    from dataclasses import make_dataclass

    names = ["local_rqa", "local_rqa.schema", "local_rqa.schema.document"]
    saved = {n: sys.modules.get(n) for n in names}
    module = types.ModuleType("local_rqa.schema.document")
    cls = make_dataclass(
        "Document",
        [("page_content", str), ("fmt_content", str, field(default="")), ("metadata", dict, field(default_factory=dict))],
    )
    cls.__module__ = "local_rqa.schema.document"
    module.Document = cls
    try:
        for n in names:
            sys.modules[n] = module if n == names[-1] else types.ModuleType(n)
        objs = [cls(d["page_content"], d["fmt_content"], d["metadata"]) for d in docs]
        path.write_bytes(pickle.dumps(objs, protocol=4))
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    docs, facts = build_documents()
    train, evals, tests = make_rows(docs, facts, rng)
    write_jsonl(docs, out / "documents.jsonl")
    write_localrqa_pickle(docs, out / "documents.pkl")
    write_jsonl(train, out / "train_w_qa.jsonl")
    write_jsonl(evals, out / "eval_w_qa.jsonl")
    write_jsonl(tests, out / "test_w_qa.jsonl")
    n_facts = sum(len(f) for f in facts)
    print(f"{len(docs)} documents, {n_facts} facts; {len(train)} train, {len(evals)} eval, {len(tests)} test rows -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
