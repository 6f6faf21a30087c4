#!/usr/bin/env python3
"""Writes a copy of a safetensors file with every F32 tensor stored as BF16 (round to nearest
even). Used by scripts/gpu-pack.sh to fit a model into a GPU machine's upload limit; a GPU run
with bf16 base weights computes with exactly these values. Standard library only.

usage: to_bf16_safetensors.py IN OUT
"""
import json
import struct
import sys
from array import array


def main(src, dst):
    with open(src, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out_header, chunks, offset = {}, [], 0
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0] if kv[0] != "__metadata__" else -1):
        if name == "__metadata__":
            out_header[name] = info
            continue
        a, b = info["data_offsets"]
        raw = data[a:b]
        if info["dtype"] == "F32":
            words = array("I")
            words.frombytes(raw)
            if sys.byteorder != "little":
                words.byteswap()
            half = array("H", [((x + 0x7FFF + ((x >> 16) & 1)) >> 16) & 0xFFFF for x in words])
            if sys.byteorder != "little":
                half.byteswap()
            raw = half.tobytes()
            info = dict(info, dtype="BF16")
        out_header[name] = dict(info, data_offsets=[offset, offset + len(raw)])
        chunks.append(raw)
        offset += len(raw)
    h = json.dumps(out_header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for c in chunks:
            f.write(c)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
