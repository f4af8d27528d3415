"""Regenerate the real-model demo task shipped in data/extract/: pull four fields out of a sentence, one per line.

    user:      "Maria Lopez is a 34-year-old nurse who lives in Madrid."
    assistant: "name: Maria Lopez\nage: 34\ncity: Madrid\njob: nurse"

Chat rows with a one-line system prompt, so SmolLM2-Instruct's own chat template frames them. The base model
answers in prose, lists or JSON of its own shape: exact match near 0. Eval rows use first names, surnames and
cities that never appear in training, and sentence templates of their own half the time, so the score measures
the learned format and copying, not memory. Training spans about 90 names of each kind and 100 cities (rare,
many-token ones among them). "key: value" lines, not JSON: a value after ": " is the same tokens as in the
sentence (" Cardiff"), where JSON's opening quote makes it other tokens ("Card"...), which a 135M model copies
badly for names it never saw (57.5% exact match as JSON, 97.5% as lines, same steps). Deterministic: running it
again writes the same files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "data" / "extract"
SYSTEM = "Extract name, age, city and job, one per line."

FIRST = (
    "Maria James Aiko Lucas Fatima Noah Elena Omar Sofia Liam Priya Mateo Hannah Kenji Amara Felix Chloe Ravi "
    "Ingrid Diego Nadia Tomas Leila Hugo Yara Arjun Clara Samuel Mei Viktor Anton Beatriz Cyrus Dalia Erik Farah "
    "Gustav Hiroshi Imani Jonas Katya Lorenzo Mira Nikolai Odile Pedro Quentin Rosa Stefan Tariq Ulla Vera Wen "
    "Ximena Yusuf Zara Bruno Carmen Dmitri Esme Florin Greta Hamid Ilse Joaquin Kofi Lucia Magnus Nina Otto "
    "Paz Rafael Selma Theo Uma Vikram Wanda Yosef Zeynep "
    "Zoe Emil Alma Pablo Ines Oscar"
).split()  # the last 6 are held out
LAST = (
    "Lopez Smith Tanaka Martin Khan Brown Rossi Haddad Silva Walker Patel Garcia Weber Sato Okafor Novak "
    "Dubois Mehta Larsen Ortiz Petrov Costa Nasser Moreau Cohen Singh Andersen Bianchi Castillo Dimitrov "
    "Eriksson Ferreira Gallagher Horvat Iyer Jansen Kowalski Lindqvist Mbeki Nakamura Oyelaran Popescu Quint "
    "Ramos Schmidt Torres Ueda Vasquez Yamada Zielinski Abbasi Brennan Chowdhury Delgado Engel Fontaine Gruber "
    "Herrera Ishikawa Jovanovic Kaur Lindgren Moretti Nguyen Olsen Pereira Reyes Sokolov Takahashi "
    "Berg Evans Wong Ivanova Fischer Keller"
).split()  # the last 6 are held out
CITIES = (
    "Madrid Boston Osaka Lyon Lahore Denver Turin Beirut Lisbon Leeds Pune Seville Munich Kyoto Lagos Prague "
    "Nantes Delhi Bergen Quito Kazan Porto Cairo Geneva Haifa Austin Accra Bogota Chennai Dakar Edinburgh "
    "Florence Glasgow Hanoi Izmir Jakarta Krakow Leipzig Malaga Nagoya Odessa Perth Quebec Rotterdam Santiago "
    "Tbilisi Utrecht Valencia Warsaw Yokohama Zagreb Antwerp Bilbao Calgary Dresden Eindhoven Fukuoka Granada "
    "Helsinki Istanbul Jaipur Kampala Lima Marseille Nairobi Ottawa Palermo Rabat Sapporo Toulouse Vienna "
    "Ouagadougou Reykjavik Ushuaia Yerevan Zanzibar Antananarivo Bratislava Chisinau Dushanbe Gaborone Honiara "
    "Kinshasa Ljubljana Mogadishu Nouakchott Paramaribo Podgorica Thimphu Vientiane Windhoek Bujumbura Asuncion "
    "Tegucigalpa Maseru Lilongwe "
    "Oslo Cardiff Manila Riga Hamburg Dublin"
).split()  # the last 6 are held out
JOBS = (
    "nurse teacher pilot chef baker lawyer plumber architect dentist farmer journalist librarian "
    "electrician pharmacist carpenter designer engineer painter mechanic translator"
).split()
TEMPLATES = [
    "{name} is a {age}-year-old {job} who lives in {city}.",
    "Meet {name}: {age}, works as a {job}, based in {city}.",
    "{name} ({age}) has worked as a {job} in {city} for years.",
    "Our new {job}, {name}, is {age} and just moved to {city}.",
    "{city} resident {name}, {age}, is a {job}.",
    "At {age}, {name} is the best-known {job} in {city}.",
]
EVAL_TEMPLATES = [
    "{name}, a {job} aged {age}, calls {city} home.",
    "From {city}: {name}, {age} years old, {job}.",
]


def row(rng: random.Random, first: list[str], last: list[str], cities: list[str], templates: list[str]) -> dict:
    name = f"{rng.choice(first)} {rng.choice(last)}"
    age, city, job = rng.randint(19, 78), rng.choice(cities), rng.choice(JOBS)
    sentence = rng.choice(templates).format(name=name, age=age, city=city, job=job)
    answer = f"name: {name}\nage: {age}\ncity: {city}\njob: {job}"
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": sentence},
            {"role": "assistant", "content": answer},
        ]
    }


def main() -> None:
    rng = random.Random(0)
    # held out: the last 6 first names, 6 surnames and 6 cities never appear in training
    train = [row(rng, FIRST[:-6], LAST[:-6], CITIES[:-6], TEMPLATES) for _ in range(800)]
    evals = [row(rng, FIRST[-6:], LAST[-6:], CITIES[-6:], TEMPLATES if i % 2 else EVAL_TEMPLATES) for i in range(60)]
    OUT.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("eval", evals)):
        with open(OUT / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"wrote {len(train)} training and {len(evals)} held-out rows to {OUT}")


if __name__ == "__main__":
    main()
