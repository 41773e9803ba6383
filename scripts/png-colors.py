#!/usr/bin/env python3
"""png-colors.py: counts the pixels of a PNG in given colours (standard library only), for
the graph page's screenshot check (tests/test_graph_page.c).

    python3 scripts/png-colors.py FILE.png COLOUR...

COLOUR is RRGGBB hex (matched within 3 per channel) or `blue` / `red`: the graph page's
link hues as drawn at their opacity over white (blue: B at least 56 over R and over 180;
red: R at least 51 over G, with G and B within 20 of each other). Prints one count per
colour on one line. 8-bit RGB or RGBA, not interlaced."""
import struct
import sys
import zlib


def pixels(path):
    data = open(path, "rb").read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        sys.exit(f"{path}: not a PNG")
    pos, idat, w = 8, b"", 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
            if depth != 8 or ctype not in (2, 6) or interlace:
                sys.exit(f"{path}: depth {depth}, colour type {ctype}, interlace {interlace}: not handled")
            bpp = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += body
    raw, stride, prev, out = zlib.decompress(idat), w * bpp, bytearray(w * bpp), []
    for y in range(h):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out.append(bytes(line))
        prev = line
    return w, h, bpp, out


def main():
    w, h, bpp, rows = pixels(sys.argv[1])
    tests = []
    for c in sys.argv[2:]:
        if c == "blue":
            tests.append(lambda r, g, b: b - r >= 56 and b > 180)
        elif c == "red":
            tests.append(lambda r, g, b: r - g >= 51 and abs(g - b) <= 20)
        else:
            t = tuple(int(c[i:i + 2], 16) for i in (0, 2, 4))
            tests.append(lambda r, g, b, t=t: abs(r - t[0]) <= 3 and abs(g - t[1]) <= 3 and abs(b - t[2]) <= 3)
    counts = [0] * len(tests)
    for line in rows:
        for x in range(0, w * bpp, bpp):
            r, g, b = line[x], line[x + 1], line[x + 2]
            if r == g == b == 255:
                continue
            for k, t in enumerate(tests):
                if t(r, g, b):
                    counts[k] += 1
    print(" ".join(map(str, counts)))


if __name__ == "__main__":
    main()
