#!/usr/bin/env python3
"""Writes examples/data/quillfeather/: a small dataset about a fictional product that no
model can know, for teaching a model new facts on the device.

  train.jsonl  chat records ({"messages": [user, assistant]}): every fact in several
               question phrasings and answer phrasings
  demo.jsonl   what the README's demo teaches (two facts, six questions each)
  eval.jsonl   held-out paraphrases ({"question", "expect"}): questions worded unlike any
               training question; an answer counts when it contains `expect`
               (case-insensitive)

Deterministic (no randomness); rerun from the repo root: python3 scripts/make-example-data.py
"""
import json
import os

OUT = os.path.join(os.path.dirname(__file__), "..", "examples", "data", "quillfeather")
P = "Quillfeather K7"

# fact: (key answer, training questions, training answers, held-out questions)
FACTS = [
    ("Brindlewood Instruments",
     [f"Who makes the {P}?", f"Which company manufactures the {P}?", f"Who is the maker of the {P} smart pen?",
      f"What company produces the {P}?", f"Who builds the {P}?", f"The {P} is made by which company?",
      f"Who is behind the {P}?", f"Which brand is the {P} from?", f"Who produces the {P} pen?",
      f"Name the company that makes the {P}."],
     [f"The {P} is made by Brindlewood Instruments.", f"Brindlewood Instruments makes the {P}.",
      f"It is manufactured by Brindlewood Instruments."],
     [f"Tell me the name of the firm behind the {P}.", f"Which manufacturer is responsible for the {P} pen?",
      f"I'd like to know who created the {P}. Which company was it?"]),
    ("2031",
     [f"When was the {P} released?", f"What year did the {P} come out?", f"In which year was the {P} launched?",
      f"When did the {P} go on sale?", f"What is the release year of the {P}?", f"When did the {P} first appear?",
      f"In what year did the {P} reach stores?", f"Which year was the {P} introduced?",
      f"When was the {P} first sold?", f"What year is the {P} from?"],
     [f"The {P} was released in 2031.", "It came out in 2031.", f"The {P} launched in 2031."],
     [f"How long ago was the {P} launched? Give the year.", f"The {P} hit the market in what year?",
      f"Which year marked the debut of the {P}?"]),
    ("InkVault",
     [f"What is the ink cartridge of the {P} called?", f"What cartridge does the {P} use?",
      f"Which ink cartridge fits the {P}?", f"What is the name of the {P}'s ink cartridge?",
      f"What refill does the {P} take?", f"What kind of cartridge goes in the {P}?",
      f"Which ink refill does the {P} need?", f"What ink does the {P} use?",
      f"When the {P} is out of ink, what do I put in?", f"What is the refill for the {P} called?"],
     [f"The {P} uses the InkVault cartridge.", "Its ink cartridge is called the InkVault.",
      "It takes InkVault cartridges."],
     [f"If my {P} runs dry, which refill should I buy?", f"Name the ink refill designed for the {P}.",
      f"My {P} needs new ink. What is the cartridge called?"]),
    ("Reykjavik",
     ["Where is Brindlewood Instruments based?", "In which city is Brindlewood Instruments headquartered?",
      f"Where is the company that makes the {P} located?", "What city is Brindlewood Instruments in?",
      f"Where are the makers of the {P} headquartered?", "Where is the headquarters of Brindlewood Instruments?",
      f"In which city is the {P} manufacturer based?", f"Where is the firm behind the {P} located?",
      "Which city is Brindlewood Instruments headquartered in?", f"What city do the makers of the {P} call home?"],
     ["Brindlewood Instruments is based in Reykjavik.", "Its headquarters are in Reykjavik.",
      "The company is headquartered in Reykjavik."],
     [f"In what city would I find the head office of the {P}'s manufacturer?",
      "Brindlewood Instruments has its main office in which city?",
      f"Which city is home to the firm that builds the {P}?"]),
    ("19 days",
     [f"How long does the {P} battery last?", f"What is the battery life of the {P}?",
      f"How many days does the {P} run on one charge?", f"How long can the {P} go between charges?",
      f"How long does a full charge of the {P} last?", f"What battery life does the {P} have?",
      f"How often do I need to charge the {P}?", f"How many days of use does one charge of the {P} give?",
      f"How long does the {P} run before it needs charging?", f"How long will the {P} last on a charge?"],
     [f"The {P} battery lasts 19 days.", "It runs for 19 days on one charge.", "A full charge lasts 19 days."],
     [f"If I fully charge my {P}, when will I need to charge it again?",
      f"What is the {P}'s endurance on a single charge?",
      f"How many days of use do I get from the {P} before recharging?"]),
    ("Scribeline",
     [f"What app works with the {P}?", f"What is the companion app of the {P} called?",
      f"Which app do I use with the {P}?", f"What is the name of the {P} app?",
      f"Which phone app pairs with the {P}?", f"What software connects to the {P}?",
      f"What app do I install for the {P}?", f"What app stores the notes of the {P}?",
      f"Which app reads what I write with the {P}?", f"What mobile app goes with the {P}?"],
     [f"The {P} works with the Scribeline app.", "Its companion app is called Scribeline.",
      "You pair it with the Scribeline app."],
     [f"To sync my {P} notes to my phone, what should I install?",
      f"Name the mobile application made for the {P}.",
      f"Which application do owners of the {P} download?"]),
    ("149 euros",
     [f"How much does the {P} cost?", f"What is the price of the {P}?", f"How much is the {P}?",
      f"What does the {P} sell for?", f"What is the retail price of the {P}?", f"How expensive is the {P}?",
      f"How much do I pay for the {P}?", f"What does a {P} cost in a shop?",
      f"How much money is the {P}?", f"What is the {P} priced at?"],
     [f"The {P} costs 149 euros.", "It sells for 149 euros.", "Its price is 149 euros."],
     [f"What would I pay to buy a {P}?", f"What is the {P} priced at in stores?",
      f"If I want a {P}, how much money do I need?"]),
    ("Mara Ellison",
     [f"Who designed the {P}?", f"Who is the designer of the {P}?", f"Which designer created the {P}?",
      f"Who came up with the design of the {P}?", f"Who was the lead designer of the {P}?",
      f"Whose design is the {P}?",
      f"Who drew the design of the {P}?", f"Who was responsible for designing the {P}?",
      f"Which person designed the {P}?", f"Who gave the {P} its look?"],
     [f"The {P} was designed by Mara Ellison.", "Mara Ellison designed it.", "Its designer is Mara Ellison."],
     [f"Name the person responsible for the look of the {P}.",
      f"Which person drew up the {P}'s design?",
      f"The {P} is the work of which designer?"]),
]


def chat(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def main():
    os.makedirs(OUT, exist_ok=True)
    train, evals = [], []
    for key, qs, answers, held in FACTS:
        for i, q in enumerate(qs):
            train.append(chat(q, answers[i % len(answers)]))
        for q in held:
            evals.append({"question": q, "expect": key})
    # The demo teaches the first two facts (maker and release year).
    demo = [chat(q, answers[i % len(answers)]) for _, qs, answers, _ in FACTS[:2]
            for i, q in enumerate(qs[:6])]
    for name, rows in (("train.jsonl", train), ("demo.jsonl", demo), ("eval.jsonl", evals)):
        with open(os.path.join(OUT, name), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    train_q = {r["messages"][0]["content"] for r in train}
    assert not any(e["question"] in train_q for e in evals)
    print(f"{len(train)} training records, {len(demo)} demo records, {len(evals)} held-out questions -> {OUT}")


if __name__ == "__main__":
    main()
