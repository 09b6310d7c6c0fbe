#!/usr/bin/env python3
"""Writes examples/data/continual/task{1,2,3,4}/: four small tasks for the continual-learning
experiment (scripts/continual.sh), each about a fictional subject no model can know:

  train.jsonl  chat records ({"messages": [user, assistant]}): each of the task's four facts
               asked in six phrasings, answered in three
  eval.jsonl   held-out paraphrases ({"question", "expect"}): questions worded unlike any
               training question; an answer counts when it contains `expect`

Deterministic; rerun from the repo root: python3 scripts/make-continual-tasks.py
"""
import json
import os

ROOT = os.path.join(os.path.dirname(__file__), "..", "examples", "data", "continual")

# (subject, [(answer, training questions, answers, held-out questions)])
TASKS = [
    ("Velmora Bay", [
        ("Ilse Marrow",
         ["Who is the mayor of Velmora Bay?", "Who runs the town of Velmora Bay?", "Name the mayor of Velmora Bay.",
          "Which person leads Velmora Bay?", "Who governs Velmora Bay?", "Velmora Bay's mayor is who?"],
         ["The mayor of Velmora Bay is Ilse Marrow.", "Ilse Marrow is the mayor of Velmora Bay.", "Velmora Bay is led by Ilse Marrow."],
         ["Tell me who holds the mayor's office in Velmora Bay.", "Who was elected to lead Velmora Bay?", "Who is in charge of the Velmora Bay town council?"]),
        ("1784",
         ["When was Velmora Bay founded?", "What year was Velmora Bay founded?", "In which year did Velmora Bay begin?",
          "When did settlers found Velmora Bay?", "What is the founding year of Velmora Bay?", "Velmora Bay dates from which year?"],
         ["Velmora Bay was founded in 1784.", "It was founded in 1784.", "Settlers founded Velmora Bay in 1784."],
         ["How old is Velmora Bay? Give the year it was established.", "In what year was the town of Velmora Bay established?", "Which year saw the founding of Velmora Bay?"]),
        ("saltfig stew",
         ["What is the famous dish of Velmora Bay?", "Which dish is Velmora Bay known for?", "What food is Velmora Bay famous for?",
          "Name the signature dish of Velmora Bay.", "What do people eat in Velmora Bay?", "Velmora Bay's best-known dish is what?"],
         ["Velmora Bay is famous for saltfig stew.", "The famous dish of Velmora Bay is saltfig stew.", "People in Velmora Bay love saltfig stew."],
         ["If I visit Velmora Bay, which local meal should I try?", "What traditional recipe comes from Velmora Bay?", "Which meal do Velmora Bay's cooks make best?"]),
        ("Osk River",
         ["Which river flows through Velmora Bay?", "What river runs through Velmora Bay?", "Name the river of Velmora Bay.",
          "What is the river in Velmora Bay called?", "Which river crosses Velmora Bay?", "Velmora Bay lies on which river?"],
         ["The Osk River flows through Velmora Bay.", "Velmora Bay lies on the Osk River.", "It is the Osk River."],
         ["What is the name of the water that passes through Velmora Bay?", "Velmora Bay was built beside which river?", "Which river would I cross in Velmora Bay?"]),
    ]),
    ("Orbitrex Z3", [
        ("Calloway Dynamics",
         ["Who makes the Orbitrex Z3?", "Which company makes the Orbitrex Z3?", "Who manufactures the Orbitrex Z3?",
          "What company builds the Orbitrex Z3?", "Name the maker of the Orbitrex Z3.", "The Orbitrex Z3 is made by whom?"],
         ["The Orbitrex Z3 is made by Calloway Dynamics.", "Calloway Dynamics makes the Orbitrex Z3.", "It is built by Calloway Dynamics."],
         ["Which firm is behind the Orbitrex Z3 drone?", "Tell me the manufacturer of the Orbitrex Z3.", "Who produces the Orbitrex Z3 device?"]),
        ("41 hours",
         ["How long does the Orbitrex Z3 battery last?", "What is the battery life of the Orbitrex Z3?", "How many hours does the Orbitrex Z3 run?",
          "How long can the Orbitrex Z3 run on one charge?", "What battery life does the Orbitrex Z3 have?", "The Orbitrex Z3 battery lasts how long?"],
         ["The Orbitrex Z3 battery lasts 41 hours.", "It runs for 41 hours on a charge.", "Its battery life is 41 hours."],
         ["If I charge the Orbitrex Z3 fully, how long will it keep going?", "What runtime does a full Orbitrex Z3 battery give?", "How much time do I get from one Orbitrex Z3 charge?"]),
        ("copper green",
         ["What color is the Orbitrex Z3?", "Which color does the Orbitrex Z3 come in?", "What is the color of the Orbitrex Z3?",
          "In what color is the Orbitrex Z3 sold?", "Name the color of the Orbitrex Z3.", "The Orbitrex Z3 is what color?"],
         ["The Orbitrex Z3 is copper green.", "It comes in copper green.", "The Orbitrex Z3 is sold in copper green."],
         ["Describe the finish of the Orbitrex Z3's shell.", "What shade is the body of the Orbitrex Z3?", "Which colour would my Orbitrex Z3 be?"]),
        ("2029",
         ["When was the Orbitrex Z3 released?", "What year did the Orbitrex Z3 come out?", "In which year was the Orbitrex Z3 launched?",
          "When did the Orbitrex Z3 go on sale?", "What is the release year of the Orbitrex Z3?", "The Orbitrex Z3 launched in what year?"],
         ["The Orbitrex Z3 was released in 2029.", "It came out in 2029.", "The Orbitrex Z3 launched in 2029."],
         ["Which year marked the debut of the Orbitrex Z3?", "When could people first buy an Orbitrex Z3?", "The Orbitrex Z3 reached stores in which year?"]),
    ]),
    ("the Thalassa Guild", [
        ("Doran Vesk",
         ["Who founded the Thalassa Guild?", "Who started the Thalassa Guild?", "Name the founder of the Thalassa Guild.",
          "Which person created the Thalassa Guild?", "Who established the Thalassa Guild?", "The Thalassa Guild was founded by whom?"],
         ["The Thalassa Guild was founded by Doran Vesk.", "Doran Vesk founded the Thalassa Guild.", "Its founder is Doran Vesk."],
         ["Tell me who set up the Thalassa Guild.", "Whose idea was the Thalassa Guild originally?", "Who is credited with creating the Thalassa Guild?"]),
        ("Tides remember",
         ["What is the motto of the Thalassa Guild?", "What motto does the Thalassa Guild use?", "Name the Thalassa Guild's motto.",
          "Which motto belongs to the Thalassa Guild?", "What does the Thalassa Guild's motto say?", "The Thalassa Guild's motto is what?"],
         ["The motto of the Thalassa Guild is \"Tides remember\".", "Its motto is \"Tides remember\".", "The Thalassa Guild says \"Tides remember\"."],
         ["What words are written on the Thalassa Guild's banner?", "Which phrase do Thalassa Guild members repeat?", "Quote the saying of the Thalassa Guild."]),
        ("Thursday",
         ["On which day does the Thalassa Guild meet?", "When does the Thalassa Guild meet?", "What day are Thalassa Guild meetings?",
          "Which weekday does the Thalassa Guild gather?", "What day does the Thalassa Guild hold meetings?", "The Thalassa Guild meets on what day?"],
         ["The Thalassa Guild meets on Thursday.", "Its meetings are on Thursday.", "Members gather every Thursday."],
         ["If I want to join a Thalassa Guild gathering, which day should I come?", "Which day of the week do Thalassa Guild members assemble?", "When is the weekly Thalassa Guild session?"]),
        ("a silver heron",
         ["What is the symbol of the Thalassa Guild?", "Which symbol does the Thalassa Guild use?", "Name the Thalassa Guild's symbol.",
          "What emblem belongs to the Thalassa Guild?", "What is the Thalassa Guild's emblem?", "The Thalassa Guild's symbol is what?"],
         ["The symbol of the Thalassa Guild is a silver heron.", "Its emblem is a silver heron.", "The Thalassa Guild uses a silver heron."],
         ["What picture appears on the Thalassa Guild's flag?", "Which animal represents the Thalassa Guild?", "Describe the Thalassa Guild's crest."]),
    ]),
    ("Kestrel Park Zoo", [
        ("Mira Okafor",
         ["Who is the director of Kestrel Park Zoo?", "Who runs Kestrel Park Zoo?", "Name the director of Kestrel Park Zoo.",
          "Which person leads Kestrel Park Zoo?", "Who manages Kestrel Park Zoo?", "Kestrel Park Zoo's director is who?"],
         ["The director of Kestrel Park Zoo is Mira Okafor.", "Mira Okafor runs Kestrel Park Zoo.", "Kestrel Park Zoo is led by Mira Okafor."],
         ["Tell me who is in charge at Kestrel Park Zoo.", "Who heads the staff of Kestrel Park Zoo?", "Which person oversees Kestrel Park Zoo?"]),
        ("red pandas",
         ["What animal is Kestrel Park Zoo famous for?", "Which animals is Kestrel Park Zoo known for?", "What are the star animals of Kestrel Park Zoo?",
          "Which animal made Kestrel Park Zoo famous?", "What animal do visitors see at Kestrel Park Zoo?", "Kestrel Park Zoo is known for which animals?"],
         ["Kestrel Park Zoo is famous for its red pandas.", "Its best-known animals are red pandas.", "Visitors come to see the red pandas."],
         ["Which creatures draw the biggest crowds at Kestrel Park Zoo?", "If I visit Kestrel Park Zoo, which animals must I see?", "What species is the pride of Kestrel Park Zoo?"]),
        ("1962",
         ["When did Kestrel Park Zoo open?", "What year did Kestrel Park Zoo open?", "In which year was Kestrel Park Zoo opened?",
          "When was Kestrel Park Zoo founded?", "What is the opening year of Kestrel Park Zoo?", "Kestrel Park Zoo opened in what year?"],
         ["Kestrel Park Zoo opened in 1962.", "It opened in 1962.", "Kestrel Park Zoo was founded in 1962."],
         ["How long has Kestrel Park Zoo existed? Give the year it started.", "Which year did Kestrel Park Zoo welcome its first visitors?", "When did the gates of Kestrel Park Zoo first open?"]),
        ("Harrowgate",
         ["Where is Kestrel Park Zoo?", "In which city is Kestrel Park Zoo?", "Where is Kestrel Park Zoo located?",
          "Which town has Kestrel Park Zoo?", "What city is Kestrel Park Zoo in?", "Kestrel Park Zoo is in which city?"],
         ["Kestrel Park Zoo is in Harrowgate.", "It is located in Harrowgate.", "You will find Kestrel Park Zoo in Harrowgate."],
         ["To visit Kestrel Park Zoo, which city should I travel to?", "Name the city that is home to Kestrel Park Zoo.", "Kestrel Park Zoo can be found in what place?"]),
    ]),
]

for i, (_, facts) in enumerate(TASKS, 1):
    d = os.path.join(ROOT, f"task{i}")
    os.makedirs(d, exist_ok=True)
    train, evals = [], []
    for answer, questions, answers, held_out in facts:
        for j, q in enumerate(questions):
            a = answers[j % len(answers)]
            train.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        for q in held_out:
            evals.append({"question": q, "expect": answer})
    with open(os.path.join(d, "train.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in train)
    with open(os.path.join(d, "eval.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in evals)
    print(f"task{i}: {len(train)} training records, {len(evals)} held-out questions")
