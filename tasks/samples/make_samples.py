#!/usr/bin/env python3
"""Generate the small synthetic demo datasets shipped in tasks/samples/.

Everything here is written from scratch: template sentences filled from
hand-made lexicons.  No sentence is taken from any licensed corpus.  The
script uses only the standard library and a fixed random seed, so running it
again reproduces the files byte for byte:

    python tasks/samples/make_samples.py            # writes next to this file
    python tasks/samples/make_samples.py --out DIR  # writes into DIR

Files written
  ner_train.txt / ner_dev.txt / ner_test.txt      CoNLL-style `token TAG`, IOB2
  relation_train.txt / relation_test.txt          SemEval-2010 Task 8 layout, CRLF
  sentence_train.tsv / sentence_dev.tsv / sentence_test.tsv
                                                  `sentence<TAB>label`, positive/negative

Dev and test splits draw part of their fillers from held-out lexicon entries
that never occur in the train split, so scores on them are not pure memory.
"""

from __future__ import annotations

import argparse
import os
import random
import re

SEED = 20240611

NER_SIZES = {"train": 400, "dev": 80, "test": 80}
REL_SIZES = {"train": 400, "test": 120}
SENT_SIZES = {"train": 400, "dev": 100, "test": 100}

# Probability that a dev/test slot is filled from the held-out part of a lexicon.
HELDOUT_P = 0.35


def split_lex(items, n_heldout):
    """Return (train_items, heldout_items); the held-out part is the tail."""
    items = list(items)
    return items[:-n_heldout], items[-n_heldout:]


def pick(rng, lex, split):
    """Pick from a (train, heldout) lexicon pair according to the split."""
    train, held = lex
    if split != "train" and held and rng.random() < HELDOUT_P:
        return rng.choice(held)
    return rng.choice(train)


# ---------------------------------------------------------------------------
# NER
# ---------------------------------------------------------------------------

FIRST_NAMES = split_lex(
    """Anna Peter Maria James Sofia Daniel Laura Michael Elena Thomas Olivia
    Lucas Hannah David Chloe Samuel Grace Martin Nadia Oscar Irene Victor
    Clara Hugo Julia Felix Amira Rafael Ingrid Tomas Leila Marcus Yuki Kenji
    Priya Arjun Fatima Omar Ines Pablo Greta Stefan Mei Chen Aisha Kwame
    Zofia Mateo Noor Ivan Helga Diego Simone Emil Tariq Lena Bruno Svetlana
    Ravi Camille Joaquin""".split(),
    14,
)

LAST_NAMES = split_lex(
    """Smith Novak Rossi Fischer Garcia Okafor Tanaka Larsen Dubois Kowalski
    Silva Jensen Moreau Schmidt Petrov Haddad Murphy Andersson Costa Weber
    Nakamura Ivanova Fernandez Brennan Hoffmann Lindqvist Mendes Kovacs
    Bauer Romano Sato Nguyen Ortega Walsh Keller Varga Castillo Berger
    Eriksen Popescu Mensah Ferreira Yilmaz Horvat Lambert Wojcik Adeyemi
    Marchetti Sorensen Quinn Takahashi Delgado Halvorsen Brandt Kariuki
    Vasquez Lindgren Obi Rahman""".split(),
    14,
)

# Multi-word surnames (lower-case particles stay inside the PER span).
PARTICLE_LAST = split_lex(
    ["van Dijk", "de Vries", "van der Berg", "da Costa", "de la Cruz",
     "von Arnim", "di Marco", "Le Roux"],
    2,
)

ORGS = split_lex(
    ["Northwind Traders", "Blue Harbor Bank", "Helix Pharmaceuticals",
     "Orion Motors", "Greenfield Energy", "Silverline Airways",
     "Atlas Insurance Group", "Redwood Software", "Meridian Capital",
     "Polar Foods", "Summit Steel", "Crescent Media", "Vertex Telecom",
     "Harbor Logistics", "Falcon Aerospace", "Maple Leaf Mining",
     "Nordic Shipping Line", "Sunrise Textiles", "Keystone Chemicals",
     "Pioneer Rail", "the World Health Organization", "the United Nations",
     "the Red Cross", "the European Central Bank", "the Central Statistics Office",
     "Unity Party", "the Green Alliance", "Riverside University",
     "the Institute of Marine Science", "National Theatre Company",
     "Lakeside Rovers", "Eastport United", "Westbrook Athletic",
     "Kingsbridge City", "Ironvale Wanderers", "Copperhill Rangers",
     "Stellar Robotics", "Quantum Biotech", "Evergreen Hotels",
     "Cobalt Networks", "Amber Retail", "Granite Construction",
     "Bright Path Foundation", "Coastal Fisheries Board", "Harmony Records",
     "Lighthouse Publishing", "Zenith Electronics", "Aurora Health",
     "Tidewater Bank", "Oakmont College", "Skyline Builders",
     "the Fair Trade Council", "Ridgeway Dynamos", "Silver Lake FC",
     "Beacon Analytics", "Cedar Valley Dairy"],
    12,
)
# "the" at the start of an ORG entry is a determiner, not part of the name.

TEAMS = split_lex(
    ["Lakeside Rovers", "Eastport United", "Westbrook Athletic",
     "Kingsbridge City", "Ironvale Wanderers", "Copperhill Rangers",
     "Northgate Albion", "Southmoor Town", "Redcliff Harriers",
     "Bayview Olympic", "Ridgeway Dynamos", "Silver Lake FC",
     "Stonebridge Celtic", "Ashford Rovers"],
    4,
)

CITIES = split_lex(
    ["London", "Paris", "Berlin", "Madrid", "Rome", "Vienna", "Prague",
     "Warsaw", "Lisbon", "Dublin", "Oslo", "Stockholm", "Helsinki",
     "Copenhagen", "Athens", "Istanbul", "Cairo", "Nairobi", "Lagos",
     "Johannesburg", "Cape Town", "Mumbai", "Delhi", "Tokyo", "Osaka",
     "Seoul", "Beijing", "Shanghai", "Hong Kong", "Singapore", "Sydney",
     "Melbourne", "Toronto", "Vancouver", "New York", "Los Angeles",
     "San Francisco", "Chicago", "Mexico City", "Buenos Aires",
     "Rio de Janeiro", "Santiago", "Lima", "Bogota", "Kuala Lumpur",
     "Tel Aviv", "Budapest", "Zagreb", "Accra", "Marrakesh", "Hanoi",
     "Reykjavik", "Montevideo", "Tallinn", "Ljubljana", "Wellington",
     "Kyoto", "Porto", "Valencia", "Gdansk", "Bergen", "Casablanca",
     "Addis Ababa", "Salt Lake City", "Quito", "Tbilisi"],
    16,
)

COUNTRIES = split_lex(
    ["France", "Germany", "Spain", "Italy", "Austria", "Poland", "Portugal",
     "Ireland", "Norway", "Sweden", "Finland", "Denmark", "Greece", "Turkey",
     "Egypt", "Kenya", "Nigeria", "South Africa", "India", "Japan",
     "South Korea", "China", "Australia", "Canada", "the United States",
     "Mexico", "Argentina", "Brazil", "Chile", "Peru", "Colombia",
     "Malaysia", "Hungary", "Croatia", "Ghana", "Morocco", "Vietnam",
     "Iceland", "Uruguay", "Estonia", "Slovenia", "New Zealand",
     "the Netherlands", "Belgium", "Czech Republic", "Sri Lanka",
     "Ethiopia", "Ecuador", "Georgia", "Costa Rica"],
    12,
)

NATIONALITIES = split_lex(
    ["French", "German", "Spanish", "Italian", "Austrian", "Polish",
     "Portuguese", "Irish", "Norwegian", "Swedish", "Finnish", "Danish",
     "Greek", "Turkish", "Egyptian", "Kenyan", "Nigerian", "South African",
     "Indian", "Japanese", "Korean", "Chinese", "Australian", "Canadian",
     "American", "Mexican", "Argentine", "Brazilian", "Chilean",
     "Peruvian", "Colombian", "Hungarian", "Croatian", "Ghanaian",
     "Moroccan", "Vietnamese", "Icelandic", "Uruguayan", "Estonian",
     "Dutch", "Belgian", "Czech", "Ethiopian", "Sri Lankan"],
    10,
)

EVENTS = split_lex(
    ["World Cup", "Olympic Games", "Winter Olympics", "Tour de France",
     "Champions League", "Nobel Peace Prize", "Grammy Awards",
     "Eurovision Song Contest", "Australian Open", "Paris Marathon",
     "Berlin Film Festival", "Cannes Film Festival", "Africa Cup of Nations",
     "Copa America", "World Expo", "Venice Biennale", "Monaco Grand Prix",
     "Edinburgh Fringe", "European Championship",
     # held out (no place names inside, so context must do the work)
     "Davis Cup", "Ryder Cup", "Commonwealth Games", "Booker Prize",
     "Asian Games", "Pan American Games", "Golden Globes"],
    7,
)

# Sports events only, for templates about records, finals and fans.
SPORT_EVENTS = split_lex(
    ["World Cup", "Olympic Games", "Winter Olympics", "Tour de France",
     "Champions League", "Australian Open", "Paris Marathon",
     "Africa Cup of Nations", "Copa America", "Monaco Grand Prix",
     "European Championship",
     # held out
     "Davis Cup", "Ryder Cup", "Commonwealth Games", "Asian Games",
     "Pan American Games"],
    5,
)

LANGUAGES = split_lex(
    ["English", "Spanish", "French", "German", "Mandarin", "Arabic",
     "Portuguese", "Russian", "Japanese", "Hindi", "Swahili", "Italian",
     "Korean", "Turkish", "Dutch", "Polish", "Greek", "Hungarian",
     "Finnish", "Tagalog", "Yoruba", "Icelandic", "Catalan", "Basque"],
    6,
)

DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
ORDINALS = "second third fourth fifth sixth seventh".split()
MONTHS = ("January February March April May June July August September "
          "October November December").split()


def tok_entity(text, label):
    """Split an entity string into (token, tag) pairs; a leading 'the' is O."""
    words = text.split()
    out = []
    if words and words[0] == "the":
        out.append(("the", "O"))
        words = words[1:]
    for i, w in enumerate(words):
        out.append((w, ("B-" if i == 0 else "I-") + label))
    return out


def ner_person(rng, split, form=None):
    first = pick(rng, FIRST_NAMES, split)
    if rng.random() < 0.12:
        last = pick(rng, PARTICLE_LAST, split)
    else:
        last = pick(rng, LAST_NAMES, split)
    form = form or rng.choices(["full", "last", "initial", "double"],
                               [70, 18, 8, 4])[0]
    if form == "full":
        text = f"{first} {last}"
    elif form == "last":
        text = last[0].upper() + last[1:]
    elif form == "initial":
        text = f"{first[0]}. {last}"
    else:
        text = f"{first} {pick(rng, FIRST_NAMES, split)} {last}"
    return tok_entity(text, "PER")


def fill_ner_slot(rng, split, slot):
    """Return a list of (token, tag) for a slot name."""
    if slot == "PER":
        return ner_person(rng, split)
    if slot == "FULLPER":
        return ner_person(rng, split, "full")
    if slot == "LAST":
        return ner_person(rng, split, "last")
    if slot == "FIRST":
        return tok_entity(pick(rng, FIRST_NAMES, split), "PER")
    if slot == "ORG":
        return tok_entity(pick(rng, ORGS, split), "ORG")
    if slot == "TEAM":
        return tok_entity(pick(rng, TEAMS, split), "ORG")
    if slot == "CITY":
        return tok_entity(pick(rng, CITIES, split), "LOC")
    if slot == "COUNTRY":
        return tok_entity(pick(rng, COUNTRIES, split), "LOC")
    if slot == "PLACE":
        lex = CITIES if rng.random() < 0.6 else COUNTRIES
        return tok_entity(pick(rng, lex, split), "LOC")
    if slot == "NAT":
        return tok_entity(pick(rng, NATIONALITIES, split), "MISC")
    if slot == "EVENT":
        return tok_entity(pick(rng, EVENTS, split), "MISC")
    if slot == "SPORTEV":
        return tok_entity(pick(rng, SPORT_EVENTS, split), "MISC")
    if slot == "LANG":
        return tok_entity(pick(rng, LANGUAGES, split), "MISC")
    # --- non-entity fillers -------------------------------------------------
    if slot == "DAY":
        return [(rng.choice(DAYS), "O")]
    if slot == "MONTH":
        return [(rng.choice(MONTHS), "O")]
    if slot == "YEAR":
        return [(str(rng.randint(1985, 2024)), "O")]
    if slot == "NUM":
        return [(str(rng.choice([12, 40, 75, 120, 250, 300, 480, 900, 1500])), "O")]
    if slot == "SMALLNUM":
        return [(rng.choice("two three four five six".split()), "O")]
    if slot == "PCT":
        return [(f"{rng.randint(1, 19)}.{rng.randint(0, 9)}", "O")]
    if slot == "ORD":
        return [(rng.choice(ORDINALS), "O")]
    if slot == "SCORE":
        return [(f"{rng.randint(1, 4)}-{rng.randint(0, 3)}", "O")]
    if slot == "SETS":
        a = f"{rng.choice([6, 7])}-{rng.randint(2, 4)}"
        b = f"{rng.choice([6, 7])}-{rng.randint(1, 5)}"
        return [(a, "O"), (b, "O")]
    if slot == "TIME":
        return [(f"{rng.randint(1, 2)}:{rng.randint(0, 59):02d}.{rng.randint(0, 99):02d}", "O")]
    if slot == "RANK":
        return [(f"{rng.randint(1, 9)}.", "O")]
    raise KeyError(slot)


# Templates: whitespace-separated tokens; {SLOT} is filled above.
# Weight (first element) controls how often a template is chosen.
NER_TEMPLATES = [
    (3, "{PER} , the chief executive of {ORG} , said on {DAY} that profits would rise ."),
    (3, "{ORG} announced plans to open a new office in {CITY} next year ."),
    (3, "{PER} scored twice as {TEAM} beat {TEAM} {SCORE} in {CITY} ."),
    (2, "The {NAT} government said it would send {NUM} aid workers to {COUNTRY} ."),
    (3, "{FULLPER} was born in {CITY} and moved to {COUNTRY} as a child ."),
    (2, "Shares of {ORG} fell {PCT} percent on {DAY} ."),
    (2, "{LAST} told reporters in {CITY} that the talks had been useful ."),
    (2, "The {EVENT} will be held in {CITY} in {YEAR} ."),
    (2, "{PER} speaks fluent {LANG} and {LANG} ."),
    (2, "Police said the suspect was arrested near the station on {DAY} ."),
    (2, "Prices rose by {PCT} percent in the third quarter , the report said ."),
    (2, "{ORG} and {ORG} agreed to merge in a deal worth {NUM} million dollars ."),
    (3, "{NAT} striker {PER} signed a {SMALLNUM} - year contract with {TEAM} ."),
    (2, "Officials from {COUNTRY} and {COUNTRY} met in {CITY} to discuss trade ."),
    (3, "\" We are very pleased with the result , \" said {PER} ."),
    (2, "{PER} won the {EVENT} for the {ORD} time ."),
    (2, "The museum in {CITY} will show works by {NAT} painters this summer ."),
    (2, "According to {ORG} , the number of visitors to {COUNTRY} rose sharply ."),
    (2, "{RANK} {FULLPER} ( {COUNTRY} ) {TIME}"),
    (2, "The company , based in {CITY} , makes parts for {ORG} ."),
    (3, "{PER} , a spokesman for {ORG} , declined to comment ."),
    (2, "Thousands of fans travelled to {CITY} for the {SPORTEV} final ."),
    (2, "The film , shot in {LANG} , opens in {COUNTRY} next month ."),
    (2, "{FULLPER} 's new book describes a childhood in {COUNTRY} ."),
    (1, "Rain delayed the match for two hours on {DAY} ."),
    (2, "{ORG} said it expects sales to grow by {PCT} percent ."),
    (2, "Minister {PER} arrived in {CITY} on {DAY} for a two-day visit ."),
    (2, "The {NAT} team finished third behind {COUNTRY} and {COUNTRY} ."),
    (2, "{PER} and {PER} will lead the delegation to the {EVENT} ."),
    (2, "Analysts at {ORG} expect the central bank to cut interest rates ."),
    (1, "The river flooded several villages south of {CITY} ."),
    (2, "{PER} joined {ORG} in {YEAR} after working for {ORG} in {CITY} ."),
    (2, "He said the {NAT} economy would recover by {YEAR} ."),
    (1, "Tickets for the concert sold out within {SMALLNUM} hours ."),
    (2, "{ORG} chairman {PER} will step down at the end of the year ."),
    (2, "The {LANG} edition of the magazine is sold in {COUNTRY} and {COUNTRY} ."),
    (2, "Flights between {CITY} and {CITY} were cancelled because of the storm ."),
    (2, "{LAST} , who coaches {TEAM} , praised the {NAT} defenders ."),
    (2, "Scientists at {ORG} in {CITY} published the study on {DAY} ."),
    (2, "{PER} beat {PER} {SETS} to reach the semi-finals ."),
    (1, "The meeting ended without agreement , officials said ."),
    (2, "{COUNTRY} 's foreign minister , {PER} , called for calm ."),
    (2, "Many {NAT} tourists visit {CITY} every spring ."),
    (2, "{ORG} will sponsor the {EVENT} for the next {SMALLNUM} years ."),
    (2, "In {CITY} , {PER} told a news conference that {ORG} would hire {NUM} workers ."),
    (2, "{PER} of {COUNTRY} set a new record at the {SPORTEV} in {CITY} ."),
    (2, "Teachers in {COUNTRY} will start teaching {LANG} in primary schools ."),
    (1, "The bridge was closed for repairs on {DAY} morning ."),
    (2, "{TEAM} coach {PER} was sent off in the second half ."),
    (2, "{FIRST} said she had never visited {COUNTRY} before ."),
    (1, "Unemployment fell to its lowest level in {SMALLNUM} years in {MONTH} ."),
    (2, "The {NAT} and {NAT} leaders signed the agreement in {CITY} on {DAY} ."),
    (2, "{ORG} opened its first store in {PLACE} in {MONTH} {YEAR} ."),
    (2, "Born in {PLACE} , {PER} studied {LANG} at {ORG} ."),
    (1, "The new school year starts in {MONTH} ."),
    (2, "{TEAM} drew {SCORE} with {TEAM} on {DAY} ."),
    (2, "A court in {CITY} fined {ORG} for breaking safety rules ."),
    (2, "Why did {PER} leave {ORG} so suddenly ?"),
    (2, "{PER} : \" The {EVENT} was the best week of my life . \""),
    (1, "Fewer people are buying newspapers , a survey found ."),
    (2, "The {NAT} - born singer {PER} will perform at the {EVENT} ."),
    (2, "{PER} translated the novel from {LANG} into {LANG} ."),
    (2, "Organisers of the {EVENT} expect record crowds this year ."),
    (2, "The {EVENT} opens on {DAY} with a ceremony in {CITY} ."),
    (2, "Many {NAT} fans could not get tickets for the {SPORTEV} ."),
    (2, "She grew up speaking {LANG} at home and {LANG} at school ."),
    (2, "The {NAT} ambassador met {PER} in {CITY} on {DAY} ."),
    (2, "{ORG} hired {NUM} {NAT} engineers last year ."),
]


def ner_sentence(rng, split):
    weights = [w for w, _ in NER_TEMPLATES]
    tpl = rng.choices([t for _, t in NER_TEMPLATES], weights)[0]
    out = []
    for piece in tpl.split():
        m = re.fullmatch(r"\{([A-Z]+)\}", piece)
        if m:
            out.extend(fill_ner_slot(rng, split, m.group(1)))
        else:
            out.append((piece, "O"))
    # Capitalise a sentence-initial "the".
    if out and out[0][0] == "the":
        out[0] = ("The", out[0][1])
    return out


def make_ner(rng, split, n, seen):
    sents = []
    tries = 0
    while len(sents) < n:
        tries += 1
        assert tries < n * 50, "NER generator cannot find enough unique sentences"
        s = ner_sentence(rng, split)
        key = " ".join(t for t, _ in s)
        if key in seen:
            continue
        seen.add(key)
        sents.append(s)
    return sents


def write_ner(path, sents):
    lines = ["-DOCSTART- O", ""]
    for s in sents:
        lines.extend(f"{t} {g}" for t, g in s)
        lines.append("")
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------
# Relation classification (SemEval-2010 Task 8 layout)
# ---------------------------------------------------------------------------
# Each relation R(X, Y) has (X, Y) pairs and templates that place {X} and {Y}.
# The entity placed first in a sentence is normally <e1>; the label direction
# follows from which argument is e1: R(e1,e2) when X is e1, else R(e2,e1).

REL_PAIRS = {
    "Cause-Effect": split_lex(
        [("earthquakes", "tsunamis"), ("viruses", "fever"), ("smoking", "cancer"),
         ("heavy rain", "flooding"), ("sparks", "fires"), ("stress", "headaches"),
         ("drought", "famine"), ("explosions", "panic"), ("bacteria", "infection"),
         ("short circuits", "blackouts"), ("storms", "damage"), ("friction", "heat"),
         ("leaks", "corrosion"), ("noise", "insomnia"), ("pollen", "allergies"),
         ("overheating", "engine failure"), ("accidents", "traffic jams"),
         ("wildfires", "smoke"), ("inflation", "protests"), ("vibration", "cracks"),
         ("lightning", "power outages"), ("mold", "bad odors"), ("dehydration", "dizziness"),
         ("avalanches", "road closures"), ("toxins", "nausea"), ("rumors", "sell-offs"),
         ("erosion", "landslides"), ("gas leaks", "evacuations"), ("fatigue", "mistakes")],
        6,
    ),
    "Component-Whole": split_lex(
        [("engine", "car"), ("wheel", "bicycle"), ("keyboard", "laptop"),
         ("handle", "door"), ("screen", "phone"), ("roof", "house"),
         ("blade", "knife"), ("lens", "camera"), ("branch", "tree"),
         ("wing", "airplane"), ("chapter", "book"), ("string", "guitar"),
         ("petal", "flower"), ("battery", "flashlight"), ("sole", "shoe"),
         ("zipper", "jacket"), ("drawer", "desk"), ("sail", "boat"),
         ("lid", "teapot"), ("key", "piano"), ("circuit board", "television"),
         ("front wheel", "tractor"), ("propeller", "drone"), ("chimney", "cottage"),
         ("hinge", "gate"), ("antenna", "radio"), ("trunk", "elephant"),
         ("steering wheel", "truck")],
        6,
    ),
    "Content-Container": split_lex(
        [("coins", "jar"), ("milk", "bottle"), ("letters", "box"),
         ("apples", "basket"), ("water", "bucket"), ("clothes", "suitcase"),
         ("documents", "folder"), ("tea", "cup"), ("cookies", "tin"),
         ("wine", "barrel"), ("tools", "toolbox"), ("seeds", "envelope"),
         ("rice", "sack"), ("books", "crate"), ("money", "wallet"),
         ("olive oil", "can"), ("toys", "chest"), ("soup", "bowl"),
         ("photographs", "shoebox"), ("marbles", "pouch"), ("flour", "canister"),
         ("jewels", "casket"), ("pills", "vial"), ("shells", "bucket")],
        5,
    ),
    "Entity-Destination": split_lex(
        [("letter", "mailbox"), ("ball", "net"), ("passengers", "platform"),
         ("cargo", "harbor"), ("children", "playground"), ("patient", "hospital"),
         ("sugar", "dough"), ("water", "tank"), ("files", "archive"),
         ("cattle", "barn"), ("troops", "border"), ("coin", "fountain"),
         ("package", "warehouse"), ("students", "library"), ("boat", "shore"),
         ("bird", "nest"), ("wounded hiker", "clinic"), ("spare parts", "factory"),
         ("refugees", "camp"), ("luggage", "carousel"), ("satellite", "orbit"),
         ("sheep", "pen"), ("salmon", "river")],
        5,
    ),
    "Entity-Origin": split_lex(
        [("wine", "vineyard"), ("juice", "oranges"), ("oil", "seeds"),
         ("smoke", "chimney"), ("passengers", "train"), ("light", "lamp"),
         ("cheese", "goat milk"), ("paper", "wood"), ("honey", "hive"),
         ("ore", "mine"), ("sound", "speaker"), ("water", "spring"),
         ("syrup", "maple tree"), ("heat", "stove"), ("pearls", "oysters"),
         ("silk", "silkworms"), ("tears", "eyes"), ("fragrance", "roses"),
         ("sugar", "cane"), ("steam", "kettle"), ("wool", "sheep"),
         ("nectar", "blossoms"), ("lava", "volcano")],
        5,
    ),
    "Instrument-Agency": split_lex(
        [("scalpel", "surgeon"), ("hammer", "carpenter"), ("brush", "painter"),
         ("telescope", "astronomer"), ("camera", "photographer"),
         ("microscope", "biologist"), ("pen", "writer"), ("violin", "musician"),
         ("whistle", "referee"), ("ladder", "firefighter"),
         ("stethoscope", "doctor"), ("wrench", "mechanic"), ("rifle", "hunter"),
         ("net", "fisherman"), ("needle", "tailor"), ("chisel", "sculptor"),
         ("shovel", "gardener"), ("baton", "conductor"),
         ("compass", "navigator"), ("plow", "farmer"), ("loom", "weaver"),
         ("trowel", "bricklayer"), ("drill", "dentist")],
        5,
    ),
    "Member-Collection": split_lex(
        [("player", "team"), ("soldier", "army"), ("sheep", "flock"),
         ("bee", "swarm"), ("violinist", "orchestra"), ("tree", "forest"),
         ("wolf", "pack"), ("star", "constellation"), ("student", "class"),
         ("singer", "choir"), ("ship", "fleet"), ("sailor", "crew"),
         ("senator", "committee"), ("island", "archipelago"), ("card", "deck"),
         ("cow", "herd"), ("goose", "gaggle"), ("volunteer", "search party"),
         ("elephant", "herd"), ("dancer", "troupe"), ("juror", "jury"),
         ("ant", "colony"), ("lion", "pride")],
        5,
    ),
    "Message-Topic": split_lex(
        [("report", "pollution"), ("lecture", "history"), ("article", "elections"),
         ("book", "war"), ("documentary", "whales"), ("speech", "freedom"),
         ("essay", "poverty"), ("email", "schedule"), ("poem", "love"),
         ("survey", "housing"), ("manual", "installation"), ("song", "heartbreak"),
         ("review", "restaurant"), ("paper", "algorithms"), ("memo", "budget"),
         ("podcast", "football"), ("thesis", "migration"), ("film", "revolution"),
         ("brochure", "vaccines"), ("seminar", "taxes"), ("blog post", "gardening"),
         ("sermon", "forgiveness"), ("leaflet", "recycling"),
         ("press release", "merger")],
        6,
    ),
    "Product-Producer": split_lex(
        [("bread", "bakery"), ("cars", "factory"), ("novel", "author"),
         ("painting", "artist"), ("software", "developers"), ("symphony", "composer"),
         ("pottery", "potter"), ("microchips", "manufacturer"), ("beer", "brewery"),
         ("film", "director"), ("statue", "sculptor"), ("shoes", "cobbler"),
         ("web", "spider"), ("dam", "beavers"), ("album", "band"),
         ("bridge", "engineers"), ("map", "cartographer"), ("butter", "dairy"),
         ("vase", "glassblower"), ("quilt", "grandmother"), ("perfume", "chemist"),
         ("cabinet", "joiner"), ("jam", "cook")],
        5,
    ),
}

# Templates per relation. Use {X}/{Y}; sentence-initial slots get capitalised.
REL_TEMPLATES = {
    "Cause-Effect": [
        "The {X} caused {Y} in the region.",
        "{X} often {leads|lead:X} to {Y}.",
        "The {Y} {was|were:Y} triggered by the {X}.",
        "Doctors said the {Y} resulted from {X}.",
        "Officials blamed the {Y} on the {X}.",
        "The {X} brought widespread {Y} to the valley.",
        "Experts agree that {Y} {is|are:Y} a direct consequence of {X}.",
        "Last week's {X} set off a wave of {Y}.",
    ],
    "Component-Whole": [
        "The {X} of the {Y} was damaged.",
        "The {Y} has a broken {X}.",
        "She replaced the {X} on her old {Y}.",
        "The {Y}'s {X} needs to be cleaned.",
        "This {Y} has an unusually large {X}.",
        "He removed the {X} from the {Y} to inspect it.",
        "The {X} is the heaviest part of the {Y}.",
        "{X} damage made the {Y} useless.",
    ],
    "Content-Container": [
        "The {X} {was|were:X} kept in a {Y}.",
        "She found the {X} inside a {Y} in the attic.",
        "The {Y} contained {X}.",
        "He opened the {Y} full of {X}.",
        "A {Y} of {X} stood on the kitchen table.",
        "The old {Y} was filled with {X}.",
        "The {X} had been stored in a small {Y}.",
        "They carried the {X} in a {Y}.",
    ],
    "Entity-Destination": [
        "The {X} {was|were:X} sent to the {Y}.",
        "They moved the {X} into the {Y}.",
        "The {X} arrived at the {Y} on time.",
        "She dropped the {X} into the {Y}.",
        "The {X} {was|were:X} transported to the {Y} by night.",
        "The {Y} was the final stop for the {X}.",
        "Volunteers brought the {X} to the {Y}.",
        "The {Y} received the {X} late in the evening.",
    ],
    "Entity-Origin": [
        "The {X} came from the {Y}.",
        "The {X} {was|were:X} obtained from the {Y}.",
        "Most of the {X} {originates|originate:X} from the {Y}.",
        "The {Y} {is|are:Y} the source of the {X}.",
        "The {Y} provided all of the {X} we needed.",
        "{X} derived from the {Y} {is|are:X} highly valued.",
        "The {X} originally came out of the {Y}.",
        "We traced the {X} back to the {Y}.",
    ],
    "Instrument-Agency": [
        "The {Y} used a {X} to finish the job.",
        "With a steady {X}, the {Y} worked for hours.",
        "A {Y} cannot work without a {X}.",
        "The {Y} picked up the {X} and began.",
        "The {X} was handled carefully by the {Y}.",
        "The {Y} relies on a {X} every day.",
        "{Y} and {X} were inseparable on that long day.",
        "The old {X} belonged to a famous {Y}.",
    ],
    "Member-Collection": [
        "The {X} left the {Y} last week.",
        "The {Y} welcomed a new {X}.",
        "Every {X} in the {Y} was counted.",
        "The {Y} lost its oldest {X}.",
        "The youngest {X} of the {Y} was very shy.",
        "A single {X} wandered away from the {Y}.",
        "The {Y} grew larger when another {X} joined.",
        "The {X} is the newest member of the {Y}.",
    ],
    "Message-Topic": [
        "The {X} is about {Y}.",
        "The {X} on {Y} was published yesterday.",
        "{Y} {is|are:Y} the main subject of the {X}.",
        "She wrote a {X} describing {Y}.",
        "The {X} discusses {Y} in great detail.",
        "The {X} focuses mainly on {Y}.",
        "His {X} explains {Y} to beginners.",
        "The {X} deals with {Y}.",
    ],
    "Product-Producer": [
        "The {X} {was|were:X} made by the local {Y}.",
        "The {Y} produced the new {X}.",
        "{This|These:X} {X} {was|were:X} created by the {Y}.",
        "The {Y} built the {X} in three months.",
        "The {X} from the {Y} won the prize.",
        "The {Y} became famous thanks to the {X}.",
        "{X} of this quality {comes|come:X} only from the skilled {Y}.",
        "The {Y} finished the {X} just before winter.",
    ],
}

OTHER_NOUNS = split_lex(
    """table window garden river bicycle lamp teacher kitchen newspaper
    mountain cat village bottle radio chair road tower museum market
    bridge pencil ticket blanket cloud harbor carpet umbrella station
    coffee poster clock candle fence pillow island forest ladder jacket
    mirror notebook kettle tractor meadow statue violin compass""".split(),
    8,
)

OTHER_TEMPLATES = [
    "The {A} was next to the {B}.",
    "After visiting the {A}, we walked to the {B}.",
    "The {A} looked older than the {B}.",
    "He painted the {A} and then the {B}.",
    "The {A} and the {B} were both on sale.",
    "She forgot the {A} near the {B}.",
    "{A} and {B} were both on the shopping list.",
    "The {A} stood between the {B} and the gate.",
    "Nobody noticed the {A} behind the {B}.",
    "The {A} reminded him of the {B} at home.",
    "They talked about the {A} while fixing the {B}.",
    "The photo shows a {A} and a {B}.",
]

# Fraction of relation records in which <e2> precedes <e1> in the sentence.
E2_FIRST_P = 0.06


def cap_first(s):
    return s[0].upper() + s[1:] if s else s


PLURAL_WORDS = {"cattle", "sheep", "children", "salmon", "bacteria"}
SINGULAR_S = {"lens", "stress", "gas"}


def is_plural(noun):
    last = noun.split()[-1]
    if last in PLURAL_WORDS:
        return True
    return last.endswith("s") and not last.endswith("ss") and last not in SINGULAR_S


def render_rel(template, fills, roles):
    """fills: slot -> text; roles: slot -> 'e1'/'e2'. Returns sentence."""
    # Resolve agreement markers such as {was|were:X}.
    sent = re.sub(r"\{(\w+)\|(\w+):([A-Z])\}",
                  lambda m: m.group(2) if is_plural(fills[m.group(3)]) else m.group(1),
                  template)
    for slot, text in fills.items():
        tag = roles[slot]
        sent = sent.replace("{" + slot + "}", f"<{tag}>{text}</{tag}>", 1)
    # Capitalise sentence-initial word (inside a marker if needed).
    m = re.match(r"^(<e[12]>)?([a-z])", sent)
    if m:
        i = m.start(2)
        sent = sent[:i] + sent[i].upper() + sent[i + 1:]
    # a -> an before a vowel, also when an entity marker sits in between.
    sent = re.sub(r"\b([Aa]) ((?:<e[12]>)?[aeiou])", r"\1n \2", sent)
    return sent


def rel_record(rng, split):
    rel = rng.choices(list(REL_PAIRS) + ["Other"], [1] * len(REL_PAIRS) + [1.3])[0]
    if rel == "Other":
        tpl = rng.choice(OTHER_TEMPLATES)
        a = pick(rng, OTHER_NOUNS, split)
        b = pick(rng, OTHER_NOUNS, split)
        while b == a:
            b = pick(rng, OTHER_NOUNS, split)
        fills = {"A": a, "B": b}
        order = ["A", "B"]
    else:
        tpl = rng.choice(REL_TEMPLATES[rel])
        x, y = pick(rng, REL_PAIRS[rel], split)
        fills = {"X": x, "Y": y}
        order = sorted(["X", "Y"], key=lambda s: tpl.index("{" + s + "}"))
    e2_first = rng.random() < E2_FIRST_P
    if e2_first:
        roles = {order[0]: "e2", order[1]: "e1"}
    else:
        roles = {order[0]: "e1", order[1]: "e2"}
    sent = render_rel(tpl, fills, roles)
    if rel == "Other":
        label = "Other"
    else:
        label = f"{rel}(e1,e2)" if roles["X"] == "e1" else f"{rel}(e2,e1)"
    return sent, label, e2_first


def make_rel(rng, split, n, seen):
    recs = []
    tries = 0
    while len(recs) < n:
        tries += 1
        assert tries < n * 50, "relation generator cannot find enough unique sentences"
        sent, label, e2_first = rel_record(rng, split)
        if sent in seen:
            continue
        seen.add(sent)
        recs.append((sent, label, e2_first))
    return recs


def write_rel(path, recs, first_id, with_comments):
    lines = []
    for i, (sent, label, e2_first) in enumerate(recs):
        lines.append(f'{first_id + i}\t"{sent}"')
        lines.append(label)
        if with_comments and e2_first:
            lines.append("Comment: e2 comes before e1 in this sentence.")
        else:
            lines.append("Comment:")
        lines.append("")
    with open(path, "w", encoding="ascii", newline="") as f:
        f.write("\r\n".join(lines) + "\r\n")


# ---------------------------------------------------------------------------
# Sentence classification (sentiment)
# ---------------------------------------------------------------------------

POS_ADJ = split_lex(
    """wonderful excellent great delightful brilliant charming superb
    fantastic lovely impressive enjoyable moving clever gorgeous solid
    reliable fun beautiful remarkable outstanding sharp satisfying
    stunning terrific heartfelt gripping""".split(),
    6,
)
NEG_ADJ = split_lex(
    """terrible awful boring dull disappointing clumsy flimsy bland messy
    tedious poor weak cheap annoying confusing frustrating lifeless
    sloppy painful shoddy forgettable tiresome dreadful mediocre
    unbearable""".split(),
    6,
)
INTENS = ["", "", "", "really ", "truly ", "very ", "quite ", "absolutely "]

MOVIE_SUBJ = split_lex(
    """movie film plot script soundtrack ending cast acting dialogue
    cinematography sequel story direction performance finale
    animation screenplay documentary""".split(),
    4,
)
PRODUCT_SUBJ = split_lex(
    """phone laptop blender headset keyboard camera kettle backpack charger
    speaker mattress toaster printer watch tent jacket monitor""".split()
    + ["vacuum cleaner", "coffee machine", "electric toothbrush"],
    4,
)

POS_VERB = ["loved", "enjoyed", "adored", "really liked", "was impressed by"]
NEG_VERB = ["hated", "regretted buying", "could not stand", "was let down by",
            "got tired of"]
POS_NOUN = ["a joy", "a pleasure", "a triumph", "a gem", "money well spent",
            "worth every penny", "a real treat"]
NEG_NOUN = ["a waste of time", "a mess", "a letdown", "a waste of money",
            "a complete disaster", "a chore", "a huge disappointment"]

# Each template: (label, text). {P}/{N} = positive/negative adjective,
# {S} = subject, {I} = intensifier, {PV}/{NV}, {PN}/{NN} phrases.
SENT_TEMPLATES = [
    ("positive", "The {S} was {I}{P}."),
    ("negative", "The {S} was {I}{N}."),
    ("positive", "What a {P} {S}!"),
    ("negative", "What a {N} {S}."),
    ("positive", "I {PV} this {S} from start to finish."),
    ("negative", "I {NV} this {S} almost right away."),
    ("positive", "Honestly, the {S} is {PN}."),
    ("negative", "Honestly, the {S} is {NN}."),
    ("positive", "The {S} is {I}{P} and the price is fair."),
    ("negative", "The {S} is {I}{N} and far too expensive."),
    ("positive", "I would happily recommend this {S} to anyone."),
    ("negative", "I would not recommend this {S} to anyone."),
    ("positive", "The {S} was not {N} at all; in fact it was {P}."),
    ("negative", "The {S} was not {P} at all."),
    ("negative", "Sadly, the {S} is not nearly as {P} as the reviews claim."),
    ("positive", "I expected a {N} {S}, but it turned out {I}{P}."),
    ("negative", "I expected a {P} {S}, but it turned out {I}{N}."),
    ("positive", "Despite a slow start, the {M} is {P}."),
    ("negative", "Despite the {P} trailer, the {M} is {N}."),
    ("positive", "Never {N}, always {P}: this {S} delivers."),
    ("negative", "It is never {P}, just {N} from beginning to end."),
    ("positive", "Five stars, the {S} is {I}{P}."),
    ("negative", "One star, the {S} is {I}{N}."),
    ("positive", "My kids loved the {S} and so did I."),
    ("negative", "Even my kids found the {S} {N}."),
    ("positive", "I can't stop thinking about this {P} {S}."),
    ("negative", "I can't believe how {N} this {S} is."),
    ("positive", "No complaints at all, the {D} works {W}."),
    ("negative", "The {D} stopped working after two days."),
    ("positive", "The {S} did not disappoint."),
    ("negative", "The {S} did nothing for me."),
    ("positive", "A {I}{P} {S} that I will buy again."),
    ("negative", "A {I}{N} {S} that I will never buy again."),
    ("positive", "It's hard to find a more {P} {S} these days."),
    ("negative", "It's hard to imagine a more {N} {S}."),
    ("positive", "Not a single {N} moment in the whole {M}."),
    ("negative", "There is nothing {P} about this {S}."),
    ("positive", "The {S} exceeded all my expectations."),
    ("negative", "The {S} fell far short of my expectations."),
    ("positive", "Worth it: {P}, {P} and easy to love."),
    ("positive", "The {M} kept me smiling all the way through."),
    ("negative", "I walked out of the {M} halfway through."),
    ("positive", "The {D} is sturdy, quiet and {P}."),
    ("negative", "The {D} broke the first time I used it."),
    ("negative", "Avoid it: {N}, {N} and overpriced."),
]


def fill_sent(rng, split, tpl):
    kind = rng.random()
    subj_lex = MOVIE_SUBJ if kind < 0.5 else PRODUCT_SUBJ

    def rep(m):
        slot = m.group(1)
        if slot == "S":
            return pick(rng, subj_lex, split)
        if slot == "M":
            return pick(rng, MOVIE_SUBJ, split)
        if slot == "D":
            return pick(rng, PRODUCT_SUBJ, split)
        if slot == "P":
            return pick(rng, POS_ADJ, split)
        if slot == "N":
            return pick(rng, NEG_ADJ, split)
        if slot == "I":
            return rng.choice(INTENS)
        if slot == "W":
            return rng.choice(["well", "perfectly", "flawlessly", "beautifully"])
        if slot == "PV":
            return rng.choice(POS_VERB)
        if slot == "NV":
            return rng.choice(NEG_VERB)
        if slot == "PN":
            return rng.choice(POS_NOUN)
        if slot == "NN":
            return rng.choice(NEG_NOUN)
        raise KeyError(slot)

    text = re.sub(r"\{([A-Z]+)\}", rep, tpl)
    # Avoid "a awful ..." style article errors.
    text = re.sub(r"\b([Aa]) ([aeiou])", r"\1n \2", text)
    return cap_first(text)


def make_sent(rng, split, n, seen):
    by_label = {"positive": [t for l, t in SENT_TEMPLATES if l == "positive"],
                "negative": [t for l, t in SENT_TEMPLATES if l == "negative"]}
    rows = []
    tries = 0
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        while True:
            tries += 1
            assert tries < n * 100, "sentence generator cannot find enough unique rows"
            s = fill_sent(rng, split, rng.choice(by_label[label]))
            if re.search(r"\b(\w+), \1\b", s):
                continue  # "fun, fun and ..." reads badly
            if s not in seen:
                seen.add(s)
                break
        rows.append((s, label))
    rng.shuffle(rows)
    return rows


def write_tsv(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("sentence\tlabel\n")
        for s, l in rows:
            assert "\t" not in s and "\n" not in s and '"' not in s
            f.write(f"{s}\t{l}\n")


# ---------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.allow_abbrev = False  # a misspelled flag is an error, never a prefix match
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    # One independent RNG stream per task keeps the tasks reproducible
    # even if one generator changes.
    seen = set()
    rng = random.Random(f"{SEED}-ner")
    for split, n in NER_SIZES.items():
        write_ner(os.path.join(args.out, f"ner_{split}.txt"),
                  make_ner(rng, split, n, seen))

    seen = set()
    rng = random.Random(f"{SEED}-relation")
    write_rel(os.path.join(args.out, "relation_train.txt"),
              make_rel(rng, "train", REL_SIZES["train"], seen), 1, True)
    write_rel(os.path.join(args.out, "relation_test.txt"),
              make_rel(rng, "test", REL_SIZES["test"], seen), 8001, False)

    seen = set()
    rng = random.Random(f"{SEED}-sentence")
    for split, n in SENT_SIZES.items():
        write_tsv(os.path.join(args.out, f"sentence_{split}.tsv"),
                  make_sent(rng, split, n, seen))


if __name__ == "__main__":
    main()
