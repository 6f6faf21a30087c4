#!/usr/bin/env python3
"""Non-private TF-IDF + logistic-regression baseline for a {"text","label"} JSONL pair (issue 19).

Usage: tfidf_baseline.py TRAIN.jsonl EVAL.jsonl [EVAL2.jsonl ...]
Prints accuracy on each evaluation file. Word 1-2-grams and character 2-5-grams (sublinear tf),
logistic regression with C = 10 (multinomial), fixed for every dataset (no tuning per set).
Needs scikit-learn (install into the same virtual environment as benches/peers: see BENCHMARKS.md);
never needed by the tests.
"""
import json
import sys

from scipy.sparse import hstack
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression


def load(path):
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    return [r["text"] for r in rows], [r["label"] for r in rows]


def main(train, evals):
    x, y = load(train)
    words = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    chars = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=2, sublinear_tf=True, max_features=200000)
    features = hstack([words.fit_transform(x), chars.fit_transform(x)]).tocsr()
    clf = LogisticRegression(C=10.0, max_iter=2000).fit(features, y)
    for path in evals:
        ex, ey = load(path)
        f = hstack([words.transform(ex), chars.transform(ex)]).tocsr()
        acc = sum(int(p == t) for p, t in zip(clf.predict(f), ey)) / len(ey)
        print(f"{path}: accuracy {acc:.4f} ({len(ey)} records; trained on {len(y)})")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
