#!/usr/bin/env bash
# Writes examples/data/general/replay.jsonl: plain text the base model writes itself
# (SmolLM2-135M-Instruct, sampled at temperature 0.8 with fixed seeds) from 40 openings on
# unrelated subjects. Mixed into a fine-tuning set as {"text"} records, it replays the base
# model's own distribution, so teaching new facts does not erase general ability (the
# perplexity of unrelated text stays put). Reproducible: same model, same seeds, same text.
#
#   scripts/make-replay-data.sh [EMBER_BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
ember="${1:-target/release/ember}"
model=$(scripts/fetch-model.sh)
out=examples/data/general/replay.jsonl
mkdir -p "$(dirname "$out")"
tmp="$out.tmp"
: >"$tmp"
seed=0
while IFS= read -r opening; do
  [ -z "$opening" ] && continue
  seed=$((seed + 1))
  text=$("$ember" generate -m "$model" -p "$opening" -n 96 --temp 0.8 --top-p 0.95 --seed "$seed" --json \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["text"])')
  python3 -c 'import json,sys; print(json.dumps({"text": sys.argv[1] + sys.argv[2]}))' "$opening" "$text" >>"$tmp"
done <<'OPENINGS'
The history of the printing press began
Photosynthesis is the process by which
To bake a simple loaf of bread, you
The Pacific Ocean is the largest
In mathematics, a prime number is
The city council met on Tuesday to discuss
Volcanoes form when
A good night's sleep helps
The first computers were
Rivers shape the land by
When learning to play the guitar,
The Roman Empire was
Honeybees communicate with each other
Electric cars differ from petrol cars in that
The water cycle describes
Chess is a game in which
In the early morning, the market square
Vaccines work by
A healthy breakfast might include
The moon affects the tides because
Good writing is clear and
The Great Wall of China
Trains changed travel in the nineteenth century by
To plant a tree, first
The human heart pumps
Libraries have always been
A thunderstorm begins when
The Olympic Games started
Recycling helps the environment by
Mountains are formed when
The invention of the telephone
Cats are popular pets because
Winter in the northern hemisphere
A budget helps a family
The desert is a place where
Music has been part of human life
Sailing across the Atlantic used to take
The brain is made of
Farmers rotate their crops so that
On a clear night you can see
OPENINGS
mv "$tmp" "$out"
echo "$(wc -l <"$out") records -> $out"
