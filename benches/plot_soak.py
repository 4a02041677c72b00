#!/usr/bin/env python3
"""Plots the soak's RSS over time as a small PNG (no third-party module: a few lines drawn into
a pixel buffer, written with zlib).

    MESH_SOAK_SECS=1800 cargo test -p mesh-tests --test soak -- --nocapture
    benches/plot_soak.py target/soak.csv docs/soak-rss.png

One line per sidecar (the column order of the CSV: blue, orange, green), RSS in MiB. Light grid
lines every 1 MiB and every 5 minutes; the dashed vertical line is minute 5, where the soak's
growth check starts.
"""
import csv
import struct
import sys
import zlib

W, H, PAD = 640, 320, 24
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]


def main():
    src, out = sys.argv[1], sys.argv[2]
    with open(src) as f:
        rows = list(csv.DictReader(f))
    t = [float(r["secs"]) for r in rows]
    names = [k[: -len("_rss_kib")] for k in rows[0] if k.endswith("_rss_kib")]
    series = [[int(r[f"{n}_rss_kib"]) / 1024 for r in rows] for n in names]
    lo = min(min(s) for s in series)
    hi = max(max(s) for s in series)
    lo, hi = int(lo) - 1, int(hi) + 2
    tmax = max(t) or 1
    px = [[(255, 255, 255)] * W for _ in range(H)]

    def x(v):
        return PAD + int((W - 2 * PAD - 1) * v / tmax)

    def y(v):
        return H - PAD - 1 - int((H - 2 * PAD - 1) * (v - lo) / (hi - lo))

    def dot(cx, cy, c):
        if 0 <= cx < W and 0 <= cy < H:
            px[cy][cx] = c

    def line(x0, y0, x1, y1, c):
        n = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(n + 1):
            dot(x0 + (x1 - x0) * i // n, y0 + (y1 - y0) * i // n, c)

    grid = (225, 225, 225)
    for mib in range(lo, hi + 1):
        line(PAD, y(mib), W - PAD, y(mib), grid)
    for sec in range(0, int(tmax) + 1, 300):
        line(x(sec), PAD, x(sec), H - PAD, grid)
    if tmax > 300:
        for yy in range(PAD, H - PAD, 6):
            line(x(300), yy, x(300), yy + 2, (120, 120, 120))
    axis = (60, 60, 60)
    line(PAD, H - PAD, W - PAD, H - PAD, axis)
    line(PAD, PAD, PAD, H - PAD, axis)
    for i, s in enumerate(series):
        c = COLOURS[i % len(COLOURS)]
        for j in range(1, len(s)):
            line(x(t[j - 1]), y(s[j - 1]), x(t[j]), y(s[j]), c)
            line(x(t[j - 1]), y(s[j - 1]) + 1, x(t[j]), y(s[j]) + 1, c)
    raw = b"".join(b"\x00" + bytes(v for p in row for v in p) for row in px)

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    png = b"\x89PNG\r\n\x1a\n"
    png += chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9))
    png += chunk(b"IEND", b"")
    with open(out, "wb") as f:
        f.write(png)
    print(f"{out}: {', '.join(names)}; RSS {lo}-{hi} MiB over {tmax:.0f} s")


if __name__ == "__main__":
    main()
