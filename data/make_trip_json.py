#!/usr/bin/env python3
"""Generate data/trip_json.jsonl: free-text trip requests -> one JSON object.

Deterministic (seeded random.Random, no clock, no network), standard library only.

    python3 data/make_trip_json.py [--out PATH] [--n N] [--seed S]

Each row is {"prompt": <request>, "response": <json.dumps(obj, ensure_ascii=False)>}
where obj has exactly these keys, in this order:

    destination   str | null   place as written in the request; null if none named
    start_date    "YYYY-MM-DD" | null
    end_date      "YYYY-MM-DD" | null
    duration_days int | null   only when a duration is stated ("5 days", "a week" = 7,
                               "two weeks"/"a fortnight" = 14); "a long weekend" -> null;
                               never computed from dates
    travelers     int | null   total people including the writer ("with 3 friends" = 4)
    budget        {"amount": int, "currency": ISO code} | null   total trip budget
    interests     [str, ...] | null   canonical lowercase nouns, in order of mention

Fields not stated in the request are null (never guessed).
"""

import argparse
import datetime as dt
import json
import os
import random

KEYS = ["destination", "start_date", "end_date", "duration_days", "travelers", "budget", "interests"]

# --------------------------------------------------------------------------
# Destinations with tags that decide which interests are plausible there.
# --------------------------------------------------------------------------
DESTINATIONS = [
    # Europe
    ("Lisbon", "city beach wine"),
    ("Porto", "city wine"),
    ("Barcelona", "city beach"),
    ("Madrid", "city"),
    ("Seville", "city"),
    ("Paris", "city wine"),
    ("Nice", "city beach"),
    ("Rome", "city"),
    ("Florence", "city wine"),
    ("Venice", "city"),
    ("Sicily", "beach wine nature"),
    ("Tuscany", "wine nature"),
    ("Berlin", "city music"),
    ("Munich", "city"),
    ("Vienna", "city music"),
    ("Prague", "city"),
    ("Budapest", "city"),
    ("Amsterdam", "city cycling"),
    ("Copenhagen", "city cycling"),
    ("Stockholm", "city"),
    ("Iceland", "nature"),
    ("Edinburgh", "city"),
    ("London", "city music"),
    ("Dublin", "city music"),
    ("Athens", "city"),
    ("Santorini", "beach wine"),
    ("Crete", "beach nature"),
    ("Dubrovnik", "city beach"),
    ("Kraków", "city"),
    ("Istanbul", "city"),
    ("Switzerland", "ski nature"),
    ("Zermatt", "ski nature"),
    ("Chamonix", "ski nature"),
    ("Norway", "nature"),
    ("Scotland", "nature"),
    ("Mallorca", "beach cycling"),
    ("Madeira", "nature"),
    ("Tallinn", "city"),
    # Asia
    ("Tokyo", "city"),
    ("Kyoto", "city"),
    ("Osaka", "city"),
    ("Japan", "city nature"),
    ("Hokkaido", "ski nature"),
    ("Seoul", "city"),
    ("Bangkok", "city"),
    ("Chiang Mai", "nature"),
    ("Phuket", "beach"),
    ("Bali", "beach nature"),
    ("Vietnam", "beach nature"),
    ("Hanoi", "city"),
    ("Singapore", "city"),
    ("Hong Kong", "city"),
    ("Taipei", "city"),
    ("Kerala", "beach nature"),
    ("Rajasthan", "city"),
    ("Nepal", "nature"),
    ("Sri Lanka", "beach wildlife"),
    ("Dubai", "city beach"),
    ("Jordan", "nature"),
    ("Beijing", "city"),
    ("Shanghai", "city"),
    ("Mongolia", "nature wildlife"),
    # Africa
    ("Marrakech", "city"),
    ("Morocco", "nature"),
    ("Cairo", "city"),
    ("Egypt", "beach"),
    ("Cape Town", "city beach wine"),
    ("Kenya", "wildlife"),
    ("Tanzania", "wildlife"),
    ("Zanzibar", "beach"),
    ("Namibia", "wildlife nature"),
    ("Rwanda", "wildlife nature"),
    ("Madagascar", "wildlife nature"),
    ("Mauritius", "beach"),
    # Americas
    ("New York", "city music"),
    ("Chicago", "city music"),
    ("San Francisco", "city"),
    ("New Orleans", "city music"),
    ("Miami", "city beach"),
    ("Hawaii", "beach nature"),
    ("Alaska", "wildlife nature"),
    ("Banff", "ski nature"),
    ("Vancouver", "city nature"),
    ("Montreal", "city music"),
    ("Quebec City", "city"),
    ("Mexico City", "city"),
    ("Oaxaca", "city"),
    ("Tulum", "beach"),
    ("Costa Rica", "wildlife beach"),
    ("Cuba", "beach music"),
    ("Colombia", "city nature"),
    ("Cartagena", "city beach"),
    ("Peru", "nature"),
    ("Cusco", "nature"),
    ("Buenos Aires", "city music"),
    ("Patagonia", "nature"),
    ("Rio de Janeiro", "city beach"),
    ("Chile", "nature wine"),
    ("Mendoza", "wine nature"),
    # Oceania and Antarctica
    ("Sydney", "city beach"),
    ("Melbourne", "city"),
    ("New Zealand", "nature"),
    ("Queenstown", "ski nature"),
    ("Fiji", "beach"),
    ("Tasmania", "nature wildlife"),
    ("Antarctica", "wildlife"),
]

BASE_INTERESTS = ["food", "history", "photography", "culture", "architecture"]
TAG_INTERESTS = {
    "city": ["museums", "nightlife", "shopping", "art", "architecture", "food"],
    "beach": ["beaches", "diving", "snorkeling", "surfing"],
    "nature": ["hiking", "wildlife", "camping", "photography"],
    "ski": ["skiing", "hiking"],
    "wine": ["wine"],
    "wildlife": ["wildlife", "photography"],
    "music": ["music"],
    "cycling": ["cycling"],
}
GENERIC_INTERESTS = [
    "beaches",
    "hiking",
    "food",
    "museums",
    "nightlife",
    "history",
    "wine",
    "shopping",
    "wildlife",
    "art",
    "diving",
    "culture",
]

# canonical interest -> ways it can be written in a request
INTEREST_SURFACE = {
    "hiking": ["hiking", "hiking", "long hikes"],
    "museums": ["museums"],
    "food": ["food", "good food", "local food", "street food"],
    "beaches": ["beaches", "the beach", "beach days"],
    "nightlife": ["nightlife"],
    "history": ["history", "historical sites"],
    "photography": ["photography", "taking photos"],
    "skiing": ["skiing"],
    "wine": ["wine", "wine tasting", "vineyards"],
    "architecture": ["architecture"],
    "shopping": ["shopping"],
    "wildlife": ["wildlife", "wildlife watching", "seeing wildlife"],
    "art": ["art", "art galleries"],
    "diving": ["diving", "scuba diving"],
    "snorkeling": ["snorkeling", "snorkelling"],
    "surfing": ["surfing"],
    "culture": ["culture", "local culture"],
    "music": ["music", "live music"],
    "camping": ["camping"],
    "cycling": ["cycling"],
}

MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
NUM_WORDS = {
    1: "one",
    2: "two",
    3: "three",
    4: "four",
    5: "five",
    6: "six",
    7: "seven",
    8: "eight",
    9: "nine",
    10: "ten",
    11: "eleven",
    12: "twelve",
    14: "fourteen",
    21: "twenty-one",
}

CURRENCIES = [  # code, weight, scale, forms ({a} plain int, {c} with commas, {k} thousands)
    ("EUR", 30, "std", ["€{c}", "€{a}", "{c} euros", "{a} euros", "{a} EUR", "EUR {c}", "€{k}k", "{k}k euros"]),
    ("USD", 25, "std", ["${c}", "${a}", "${k}k", "{c} US dollars", "{a} USD", "USD {c}"]),
    ("GBP", 15, "std", ["£{c}", "£{a}", "{c} pounds", "{a} GBP", "£{k}k"]),
    ("JPY", 8, "jpy", ["¥{c}", "{c} yen", "JPY {c}"]),
    ("CHF", 5, "std", ["CHF {c}", "{c} Swiss francs"]),
    ("AUD", 6, "std", ["A${c}", "{c} Australian dollars", "AUD {c}"]),
    ("CAD", 6, "std", ["C${c}", "{c} Canadian dollars", "CAD {c}"]),
    ("INR", 5, "inr", ["₹{c}", "{c} Indian rupees", "INR {c}"]),
]

SOMEWHERE = [
    "somewhere warm",
    "somewhere sunny",
    "somewhere quiet",
    "somewhere new",
    "somewhere affordable",
    "somewhere by the sea",
    "somewhere in the mountains",
]
VAGUE_WHEN = [
    "sometime in the spring",
    "next summer",
    "this autumn",
    "sometime in the winter",
    "later this year",
    "in the fall",
    "during the school holidays",
]


def ordinal(n):
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def join_list(rng, items):
    if len(items) == 1:
        return items[0]
    if len(items) == 2:
        return f"{items[0]} {rng.choice(['and', '&'])} {items[1]}"
    last_sep = rng.choice([" and ", ", and "])
    return ", ".join(items[:-1]) + last_sep + items[-1]


def cap(s):
    return s[:1].upper() + s[1:]


# --------------------------------------------------------------------------
# Dates
# --------------------------------------------------------------------------
def fmt_date(d, style, with_year=True):
    m = MONTHS[d.month - 1]
    if style == "iso":
        return d.isoformat()
    if style == "mdy":
        return f"{m} {d.day}, {d.year}" if with_year else f"{m} {d.day}"
    if style == "mdy_ord":
        return f"{m} {ordinal(d.day)}, {d.year}" if with_year else f"{m} {ordinal(d.day)}"
    if style == "dmy":
        return f"{d.day} {m} {d.year}" if with_year else f"{d.day} {m}"
    if style == "dmy_short":
        return f"{d.day} {m[:3]} {d.year}" if with_year else f"{d.day} {m[:3]}"
    raise ValueError(style)


def single_date(rng, d):
    return fmt_date(d, rng.choice(["iso", "mdy", "mdy_ord", "dmy", "dmy", "dmy_short"]))


def range_phrase(rng, s, e):
    """Inline date range phrase; every variant states the year(s)."""
    opts = []
    for st in ["iso", "mdy", "mdy_ord", "dmy"]:
        opts.append(f"from {fmt_date(s, st)} to {fmt_date(e, st)}")
    if s.year == e.year:
        y = s.year
        opts += [
            f"from {fmt_date(s, 'mdy', False)} to {fmt_date(e, 'mdy', False)}, {y}",
            f"from {fmt_date(s, 'mdy_ord', False)} to {fmt_date(e, 'mdy_ord', False)}, {y}",
            f"between {fmt_date(s, 'mdy', False)} and {fmt_date(e, 'mdy', False)}, {y}",
            f"from {fmt_date(s, 'dmy', False)} to {fmt_date(e, 'dmy', False)} {y}",
        ]
        if s.month == e.month:
            m = MONTHS[s.month - 1]
            opts += [
                f"from the {ordinal(s.day)} to the {ordinal(e.day)} of {m} {y}",
                f"from {s.day} to {e.day} {m} {y}",
                f"{m} {s.day}–{e.day}, {y}",
            ]
    return rng.choice(opts)


def bare_range(rng, s, e):
    st = rng.choice(["iso", "iso", "dmy", "mdy", "dmy_short"])
    sep = rng.choice([" to ", " - ", " – "])
    return f"{fmt_date(s, st)}{sep}{fmt_date(e, st)}"


def dur_phrase(rng, n):
    if n == 7:
        return rng.choice(["a week", "one week", "7 days", "seven days"])
    if n == 14:
        return rng.choice(["two weeks", "2 weeks", "14 days", "a fortnight"])
    if n == 21:
        return rng.choice(["three weeks", "3 weeks", "21 days"])
    if n in NUM_WORDS and rng.random() < 0.4:
        return f"{NUM_WORDS[n]} days"
    return f"{n} days"


def dur_adj(rng, n):
    if n == 7:
        return rng.choice(["one-week", "7-day", "week-long"])
    if n == 14:
        return rng.choice(["two-week", "14-day"])
    if n == 21:
        return rng.choice(["three-week", "21-day"])
    if n in NUM_WORDS and rng.random() < 0.3:
        return f"{NUM_WORDS[n]}-day"
    return f"{n}-day"


DURATIONS = [2, 3, 4, 5, 5, 6, 7, 7, 7, 8, 9, 10, 10, 12, 14, 14, 21]


def random_start(rng):
    base = dt.date(2026, 1, 1)
    return base + dt.timedelta(days=rng.randrange(0, 3 * 365))


def make_when(rng, kind):
    """Return (fields, renderings) for a 'when' of the given kind."""
    f = {"start_date": None, "end_date": None, "duration_days": None}
    r = {}
    if kind == "range" or kind == "range_dur":
        s = random_start(rng)
        e = s + dt.timedelta(days=rng.randint(1, 20))
        f["start_date"], f["end_date"] = s.isoformat(), e.isoformat()
        rp = range_phrase(rng, s, e)
        if kind == "range_dur":
            n = (e - s).days + 1  # stated duration matches the inclusive day count
            f["duration_days"] = n
            dp = dur_phrase(rng, n)
            r["inline"] = rng.choice([f"for {dp}, {rp}", f"{rp} ({dp})"])
            r["sentence"] = rng.choice(
                [f"It's {dp}, {rp}.", f"Dates: {bare_range(rng, s, e)}, so {dp}.", f"Travelling {rp}, {dp} in total."]
            )
            r["form"] = f"{bare_range(rng, s, e)} ({dp})"
        else:
            r["inline"] = rp
            r["sentence"] = rng.choice(
                [
                    f"Dates: {bare_range(rng, s, e)}.",
                    f"The trip is {rp}.",
                    f"Travelling {rp}.",
                    f"Flying out on {single_date(rng, s)} and back on {single_date(rng, e)}.",
                    f"The dates are {rp}.",
                ]
            )
            r["form"] = bare_range(rng, s, e)
    elif kind == "start":
        s = random_start(rng)
        f["start_date"] = s.isoformat()
        sd = single_date(rng, s)
        r["inline"] = rng.choice([f"leaving on {sd}", f"starting {sd}", f"departing {sd}", f"arriving on {sd}"])
        r["sentence"] = rng.choice(
            [f"Leaving on {sd}.", f"Starting on {sd}.", f"Departure date: {sd}.", f"I fly out on {sd}."]
        )
        r["form"] = rng.choice([f"from {sd}", f"start {sd}", f"departing {sd}"])
    elif kind == "start_dur":
        s = random_start(rng)
        n = rng.choice(DURATIONS)
        f["start_date"], f["duration_days"] = s.isoformat(), n
        sd, dp = single_date(rng, s), dur_phrase(rng, n)
        r["inline"] = rng.choice(
            [f"for {dp} starting {sd}", f"for {dp} from {sd}", f"leaving {sd} for {dp}", f"for {dp}, starting on {sd}"]
        )
        r["sentence"] = rng.choice(
            [f"Leaving {sd} for {dp}.", f"It'll be {dp}, starting {sd}.", f"Starting on {sd}, for {dp}."]
        )
        r["form"] = rng.choice([f"{dp} from {sd}", f"start {sd}, {dp}"])
    elif kind == "dur":
        n = rng.choice(DURATIONS)
        f["duration_days"] = n
        dp = dur_phrase(rng, n)
        r["inline"] = f"for {dp}"
        r["sentence"] = rng.choice([f"Length: {dp}.", f"It'll be {dp}.", f"Trip length: {dp}.", f"I've got {dp} off."])
        r["form"] = dp
        r["bare"] = dp
        r["adj"] = dur_adj(rng, n)
    elif kind == "vague":
        v = rng.choice(VAGUE_WHEN)
        r["inline"] = v
        r["sentence"] = rng.choice([f"Probably {v}.", f"Thinking {v}.", f"Timing: {v}."])
        r["form"] = v
    elif kind == "longweekend":
        r["inline"] = "for a long weekend"
        r["sentence"] = rng.choice(["Just a long weekend.", "It's only a long weekend."])
        r["form"] = "a long weekend"
    else:
        raise ValueError(kind)
    return f, r


WHEN_KINDS = (
    ["range"] * 30
    + ["dur"] * 25
    + ["start_dur"] * 12
    + ["range_dur"] * 8
    + ["start"] * 8
    + ["vague"] * 10
    + ["longweekend"] * 7
)


# --------------------------------------------------------------------------
# Travelers
# --------------------------------------------------------------------------
def make_travelers(rng, n):
    """Renderings for a party of n people (n includes the writer)."""
    w = NUM_WORDS.get(n, str(n))
    num = rng.choice([str(n), w])
    if n == 1:
        inline = ["solo", "alone", "on my own", "by myself"]
        sentence = [
            "It's just me.",
            "I'm travelling solo.",
            "Just me travelling.",
            "I'll be going alone.",
            "Solo trip.",
        ]
        subj = [("Travelling solo, I", "am"), ("Just me this time: I", "am")]
        form = ["1", "just me", "1 (solo)"]
    elif n == 2:
        rel = rng.choice(
            ["wife", "husband", "partner", "girlfriend", "boyfriend", "best friend", "mom", "dad", "sister", "brother"]
        )
        inline = [
            f"with my {rel}",
            f"for me and my {rel}",
            f"for {num} people",
            f"for {num} adults",
            "for the two of us",
        ]
        sentence = [
            f"It's me and my {rel}.",
            f"My {rel} and I are going.",
            "There are two of us.",
            f"We are {num} adults.",
            f"I'm going with my {rel}.",
        ]
        subj = [(f"My {rel} and I", "are"), ("The two of us", "are")]
        form = ["2", "2 adults", f"me + my {rel}"]
    else:
        fr = n - 1
        frw = rng.choice([str(fr), NUM_WORDS.get(fr, str(fr))])
        inline = [f"with {frw} friends", f"for {num} people", f"for a group of {num}", f"for {num} adults"]
        sentence = [
            f"There are {num} of us.",
            f"We're a group of {num}.",
            f"I'm going with {frw} friends.",
            f"Party of {n}.",
        ]
        subj = [(f"{cap(frw)} friends and I", "are"), (f"The {NUM_WORDS.get(n, str(n))} of us", "are")]
        form = [str(n), f"{n} people", f"{n} adults"]
        if n == 3:
            inline += ["with my parents", "with my wife and our son", "with my husband and our daughter"]
            subj += [("My parents and I", "are")]
        if n == 4:
            inline += [
                f"for a family of {num}",
                "with my wife and our two kids",
                "for 2 adults and 2 kids",
                "for two couples",
            ]
            sentence += [f"We're a family of {num}.", "It's two couples."]
            subj += [("My husband, our two kids and I", "are")]
            form += ["2 adults + 2 kids"]
        if n == 5:
            inline += [f"for a family of {num}", "with my husband and our three kids", "for 2 adults and 3 children"]
            sentence += [f"We're a family of {num}."]
            form += ["2 adults, 3 children"]
        if n == 6:
            inline += ["for three couples", f"for a family of {num}"]
    return {
        "inline": rng.choice(inline),
        "sentence": rng.choice(sentence),
        "subj": rng.choice(subj),
        "form": rng.choice(form),
    }


TRAVELER_COUNTS = [1] * 18 + [2] * 30 + [3] * 12 + [4] * 18 + [5] * 8 + [6] * 5 + [7, 8, 8, 9, 10, 12]


# --------------------------------------------------------------------------
# Budget
# --------------------------------------------------------------------------
def make_budget(rng):
    code, _, scale, forms = rng.choices(CURRENCIES, weights=[c[1] for c in CURRENCIES])[0]
    if scale == "jpy":
        amount = rng.randint(5, 150) * 10000
    elif scale == "inr":
        amount = rng.randint(2, 60) * 10000
    else:
        amount = rng.choice([rng.randint(3, 40) * 100, rng.randint(3, 30) * 500, rng.randint(1, 15) * 1000])
    usable = [f for f in forms if "{k}" not in f or (amount % 500 == 0 and amount >= 1000)]
    form = rng.choice(usable)
    k = amount / 1000
    k_str = str(int(k)) if k == int(k) else f"{k:g}"
    money = form.format(a=amount, c=f"{amount:,}", k=k_str)
    mod = rng.choice(["", "", "", "about ", "around ", "roughly ", "up to "])
    return {"amount": amount, "currency": code}, {"money": money, "np": mod + money}


def article(word):
    w = word.lower()
    if w.startswith(("8", "11", "18", "eight", "eleven", "a", "e", "i", "o", "u")) and not w.startswith("one"):
        return "an " + word
    return "a " + word


def budget_sentence(rng, money, P):
    return rng.choice(
        [
            f"Budget is {money}.",
            f"{cap(P['our'])} budget is around {money}.",
            f"Budget: {money} total.",
            f"{cap(P['we'])} can spend up to {money}.",
            f"Max {money}.",
            f"Total budget {money}.",
            f"I'd like to keep it under {money}.",
            f"{money} for the whole trip.",
        ]
    )


# --------------------------------------------------------------------------
# Interests
# --------------------------------------------------------------------------
def make_interests(rng, tags):
    pool = []
    if tags is None:
        pool = list(GENERIC_INTERESTS)
    else:
        for x in BASE_INTERESTS:
            if x not in pool:
                pool.append(x)
        for t in tags.split():
            for x in TAG_INTERESTS[t]:
                if x not in pool:
                    pool.append(x)
    k = rng.choice([1, 1, 2, 2, 2, 3, 3])
    chosen = rng.sample(pool, k)
    surf = [rng.choice(INTEREST_SURFACE[c]) for c in chosen]
    return chosen, {"text": join_list(rng, surf), "list": ", ".join(surf)}


def interests_sentence(rng, text, P):
    return rng.choice(
        [
            f"{cap(P['we'])} love {text}.",
            f"Interests: {text}.",
            f"{cap(P['we_are'])} really into {text}.",
            f"Big fan of {text}." if P["we"] == "I" else f"Big fans of {text}.",
            f"Mostly interested in {text}.",
            f"{cap(P['we'])}'d like to focus on {text}.",
        ]
    )


# --------------------------------------------------------------------------
# Templates.
#   {D} destination (required)     {X} somewhere-phrase, destination null
#   {W} when, inline (required)    {W?} optional inline   {Ws} optional sentence   {Ws!} required
#   {Wbare}/{Wadj} duration noun/adjective (template only accepts kind "dur")
#   {T} travelers inline (req.)    {T?} optional          {Ts} optional sentence    {Ts!} required
#   {Tsubj} "My wife and I" + {be} "are"
#   {B} budget noun phrase (req.)  {Bs} optional sentence {I} interests (req.) {Is} opt. sentence {Is!}
#   {we} {We} {we_are} {We_are} {our}
# A template's "kinds" restricts which 'when' kinds it accepts.
# --------------------------------------------------------------------------
ALL_KINDS = None
T = [
    ("Plan a trip to {D}{W?}{T?}.{Bs}{Is}", ALL_KINDS, None),
    ("I'm going to {D} {W}.{Ts}{Bs}{Is}", ALL_KINDS, None),
    ("Can you help me plan a trip to {D}?{Ws}{Ts}{Bs}{Is}", ALL_KINDS, None),
    ("{We} want to visit {D} {W}, budget {B}.{Ts}{Is}", ALL_KINDS, None),
    ("Trip to {D} {T}, {W}. Budget: {B}.{Is}", ALL_KINDS, None),
    ("Looking for ideas for {D}{W?}. {We} love {I}.{Ts}{Bs}", ALL_KINDS, None),
    ("hey! thinking about {D}{W?}{T?}. {we_are} into {I}, and {we} have about {Bm} to spend", ALL_KINDS, None),
    ("Dear assistant, I would like to arrange a holiday in {D} {W} {T}. My budget is {B}.{Is}", ALL_KINDS, None),
    ("{Is!}{Ts} Where should {we} go {W}?", ALL_KINDS, None),
    ("Suggest an itinerary for {D}{W?}.{Ts}{Bs}{Is}", ALL_KINDS, None),
    ("Need a plan: {D}, {W}, {T}, {B}.", ALL_KINDS, None),
    ("{D} {W}{T?} — what should {we} do? {We} like {I}.{Bs}", ALL_KINDS, None),
    ("{Tsubj} {be} planning a trip to {D}{W?}.{Bs}{Is}", ALL_KINDS, None),
    ("{Tsubj} {be} heading to {D} {W} with a budget of {B}.{Is}", ALL_KINDS, None),
    ("What's a good itinerary for {D}{W?}?{Is}{Ts}{Bs}", ALL_KINDS, None),
    (
        "Please prepare a detailed itinerary for {D}. Travel dates: {Wform}. Number of travellers: {Tform}. "
        "Budget: {B}.{Is}",
        ("range", "range_dur"),
        None,
    ),
    ("I have {Bm} and {Wbare}. Where should I go? I love {I}.", ("dur",), None),
    ("Budget {B}, {T}, {D}, {W}. Ideas?", ALL_KINDS, None),
    ("Is {B} enough for {D} {W} {T}?{Is}", ALL_KINDS, None),
    ("Going to {D} {W}! {We_are} into {I}. Any tips?{Bs}", ALL_KINDS, None),
    ("Could you put together {aWadj} itinerary for {D}{T?}?{Bs}{Is}", ("dur",), None),
    ("{Wadj_cap} trip to {D}{T?}. {Is!}{Bs}", ("dur",), None),
    ("I'd love to see {D} one day.{Ws}{Ts}{Bs}{Is}", ALL_KINDS, None),
    ("Book me something in {D} {W}{T?}, nothing over {Bm}.", ALL_KINDS, None),
    ("Solo trip to {D}{W?}.{Bs}{Is}", ALL_KINDS, 1),
    ("What can {we} do in {D} {W}?{Ts} {We} mostly care about {I}.{Bs}", ALL_KINDS, None),
    ("Need help with a trip: {D}{W?}.{Ts!}{Bs}{Is}", ALL_KINDS, None),
    ("I want to go {X} {W}{T?}. Budget {B}.{Is}", ALL_KINDS, None),
    ("Organise a trip to {D} {T}{W?}.{Is!}{Bs}", ALL_KINDS, None),
    ("{D}, {W}, {T}. Interests: {Ilist}. Budget: {B}.", ALL_KINDS, None),
    ("Thinking about a long weekend in {D}{T?}.{Bs}{Is}", ("longweekend",), None),
    ("Where should {we} stay in {D}?{Ws!}{Ts}{Bs}", ALL_KINDS, None),
    ("Quick question: {D} {W}{T?}, {B} total — doable?{Is}", ALL_KINDS, None),
    ("I'm after a relaxed trip {X}{W?}.{Ts}{Bs}{Is!}", ALL_KINDS, None),
    ("We are {Tcount} people travelling to {D} {W}. Could you recommend what to see?{Bs}{Is}", ALL_KINDS, "multi"),
    ("FORM", ALL_KINDS, None),
]

FORM_LABELS = {
    "D": ["Destination", "Where"],
    "W": ["Dates", "When"],
    "T": ["Travellers", "Travelers", "People", "Group size"],
    "B": ["Budget", "Max budget"],
    "I": ["Interests", "Into"],
}


def pronouns(n):
    if n == 1:
        return {"we": "I", "We": "I", "we_are": "I'm", "We_are": "I'm", "our": "my"}
    return {"we": "we", "We": "We", "we_are": "we're", "We_are": "We're", "our": "our"}


def render_form(rng, obj, parts):
    lines = [rng.choice(["Plan this trip:", "Trip request", "Please plan the following trip.", ""])]
    present = parts["present"]
    for key in ["D", "W", "T", "B", "I"]:
        if key in present:
            val = {
                "D": parts.get("D"),
                "W": parts.get("Wform"),
                "T": parts.get("Tform"),
                "B": parts.get("Bm"),
                "I": parts.get("Ilist"),
            }[key]
            lines.append(f"{rng.choice(FORM_LABELS[key])}: {val}")
    return "\n".join(line for line in lines if line)


def generate_one(rng):
    text, kinds, fixed_t = rng.choice(T)
    obj = {k: None for k in KEYS}

    is_form = text == "FORM"
    if is_form:
        want = {"D"}
        for key in ["W", "T", "B", "I"]:
            if rng.random() < 0.65:
                want.add(key)
        while len(want) < 3:
            want.add(rng.choice(["W", "T", "B", "I"]))
    else:
        want = set()

    def has(tok):
        return ("{" + tok) in text

    # decide which fields are present
    present = set()
    for key in ["W", "T", "B", "I"]:
        if is_form:
            if key in want:
                present.add(key)
            continue
        req = (
            has(key + "}")
            or has(key + "s!}")
            or has(key + "bare}")
            or has(key + "adj")
            or has(key + "subj}")
            or has(key + "list}")
            or has(key + "form}")
            or has(key + "count}")
            or has(key + "m}")
            or has("a" + key + "adj}")
        )
        opt_inline = has(key + "?}")
        opt_sent = has(key + "s}")
        if req:
            present.add(key)
        elif opt_inline and rng.random() < 0.7:
            present.add(key + "?")
        elif opt_sent and rng.random() < 0.5:
            present.add(key + "s")
    if fixed_t is not None:
        present = {p for p in present if not p.startswith("T")}

    # destination
    parts = {"present": {p[0] for p in present} | ({"D"} if (is_form or has("D}")) else set())}
    tags = None
    if is_form or has("D}"):
        name, tags = rng.choice(DESTINATIONS)
        obj["destination"] = name
        parts["D"] = name
    if has("X}"):
        parts["X"] = rng.choice(SOMEWHERE)

    # travelers
    n = None
    if fixed_t == 1:
        n = 1
    elif fixed_t == "multi":
        n = rng.choice([c for c in TRAVELER_COUNTS if c > 1])
    elif any(p.startswith("T") for p in present):
        n = rng.choice(TRAVELER_COUNTS)
    if n is not None:
        obj["travelers"] = n
        tr = make_travelers(rng, n)
        parts.update(
            {
                "T": tr["inline"],
                "Ts": tr["sentence"],
                "Tform": tr["form"],
                "Tsubj": tr["subj"][0],
                "be": tr["subj"][1],
                "Tcount": rng.choice([str(n), NUM_WORDS.get(n, str(n))]),
            }
        )
    P = pronouns(n if n is not None else rng.choice([1, 2]))
    parts.update(P)

    # when
    if any(p.startswith("W") for p in present):
        kind = rng.choice([k for k in WHEN_KINDS if kinds is None or k in kinds])
        if is_form and kind == "range_dur":
            kind = "range"
        f, r = make_when(rng, kind)
        obj.update(f)
        parts.update({"W": r["inline"], "Ws": r["sentence"], "Wform": r["form"]})
        if "bare" in r:
            parts.update({"Wbare": r["bare"], "Wadj": r["adj"], "Wadj_cap": cap(r["adj"]), "aWadj": article(r["adj"])})
    # budget
    if any(p.startswith("B") for p in present):
        b, br = make_budget(rng)
        obj["budget"] = b
        parts.update({"B": br["np"], "Bm": br["money"], "Bs": budget_sentence(rng, br["money"], P)})
    # interests
    if any(p.startswith("I") for p in present):
        chosen, ir = make_interests(rng, tags)
        obj["interests"] = chosen
        parts.update({"I": ir["text"], "Ilist": ir["list"], "Is": interests_sentence(rng, ir["text"], P)})

    if is_form:
        prompt = render_form(rng, obj, parts)
    else:
        out = text
        for key in ["W", "T", "B", "I"]:
            out = out.replace("{" + key + "?}", (" " + parts[key]) if (key + "?") in present else "")
            out = out.replace("{" + key + "s}", (" " + parts[key + "s"]) if (key + "s") in present else "")
            out = out.replace("{" + key + "s!}", " " + parts[key + "s"] if key in present else "")
        # remaining simple placeholders
        for name in [
            "aWadj",
            "Wadj_cap",
            "Wadj",
            "Wbare",
            "Bm",
            "Wform",
            "Tsubj",
            "Tform",
            "Tcount",
            "Ilist",
            "D",
            "X",
            "W",
            "T",
            "B",
            "I",
            "be",
            "We_are",
            "we_are",
            "We",
            "we",
            "our",
        ]:
            token = "{" + name + "}"
            if token in out:
                out = out.replace(token, parts[name])
        assert "{" not in out and "}" not in out, out
        prompt = " ".join(out.split())
        prompt = cap(prompt) if not text.startswith("hey") else prompt

    # the when-kind "vague"/"longweekend" leaves dates and duration null by design
    return prompt, obj


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------
def validate(prompt, response):
    assert isinstance(prompt, str) and prompt.strip()
    obj = json.loads(response)
    assert list(obj.keys()) == KEYS, obj.keys()
    assert response == json.dumps(obj, ensure_ascii=False)
    d = obj["destination"]
    assert d is None or (isinstance(d, str) and d in prompt)
    dates = {}
    for k in ["start_date", "end_date"]:
        v = obj[k]
        if v is not None:
            assert isinstance(v, str) and len(v) == 10
            dates[k] = dt.date.fromisoformat(v)
            assert str(dates[k].year) in prompt
    if len(dates) == 2:
        assert dates["end_date"] >= dates["start_date"]
    if obj["end_date"] is not None:
        assert obj["start_date"] is not None
    for k in ["duration_days", "travelers"]:
        v = obj[k]
        assert v is None or (type(v) is int and v > 0), (k, v)
    if obj["duration_days"] is not None and len(dates) == 2:
        assert obj["duration_days"] == (dates["end_date"] - dates["start_date"]).days + 1
    b = obj["budget"]
    if b is not None:
        assert list(b.keys()) == ["amount", "currency"]
        assert type(b["amount"]) is int and b["amount"] > 0
        assert b["currency"] in {c[0] for c in CURRENCIES}
    i = obj["interests"]
    if i is not None:
        assert isinstance(i, list) and i and len(set(i)) == len(i)
        assert all(isinstance(x, str) and x == x.lower() and x in INTEREST_SURFACE for x in i)
    return obj


def build(n, seed):
    rng = random.Random(seed)
    rows, seen = [], set()
    tries = 0
    while len(rows) < n:
        tries += 1
        if tries > n * 50:
            raise RuntimeError("could not generate enough unique prompts")
        prompt, obj = generate_one(rng)
        key = " ".join(prompt.lower().split())
        if key in seen:
            continue
        seen.add(key)
        response = json.dumps(obj, ensure_ascii=False)
        validate(prompt, response)
        rows.append({"prompt": prompt, "response": response})
    return rows


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(here, "trip_json.jsonl"))
    ap.add_argument("--n", type=int, default=320)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    rows = build(args.n, args.seed)
    with open(args.out, "w", encoding="utf-8", newline="\n") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
