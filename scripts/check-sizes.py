#!/usr/bin/env python3
"""check-sizes.py: no source file over 700 lines, no function over 100 lines.

    scripts/check-sizes.py          (host/, kernels/, tests/, bench/)

Functions are found by brace matching on the C (and CUDA) sources: a line at the left
margin that opens a brace and is not a struct, union, enum, array or extern "C" block
starts one, and its body ends where the braces balance again. Comments, strings and
character literals are blanked first so braces inside them do not count. A function that
is a plain table (initialisers, a switch of one-line cases) may be longer; such a one is
named in TABLES with the reason. Prints each violation and exits 1 if there is one."""
import glob, re, sys

MAX_FILE, MAX_FUNC = 700, 100
ROOTS = ["host/**/*.[ch]", "kernels/*.cu", "kernels/*.cuh", "kernels/*.c", "tests/*.[ch]", "tests/**/*.cpp",
         "tests/**/*.h", "tests/**/*.cu", "bench/*.[ch]"]

# Functions allowed past MAX_FUNC because they are a table, not logic: "file:function".
TABLES = {}

# Nothing is allowed past the limits; this stays empty.
KNOWN = {}


def blank(text):
    """Comments, strings and character literals replaced by spaces (newlines kept)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            j = min(j + 1, n)
            out.append(c + " " * (j - i - 2) + c if j - i >= 2 else text[i:j])
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def functions(path):
    """(name, first line, number of lines) of each function defined in path."""
    lines = blank(open(path, errors="replace").read()).split("\n")
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        start = i
        # a definition starts at the left margin; its head may run over several lines
        if line and not line[0].isspace() and not line.startswith("#") and "(" in line:
            head = line
            j = i
            while "{" not in lines[j] and ";" not in lines[j] and j < len(lines) - 1 and j - i < 8:
                j += 1
                head += " " + lines[j]
            if "{" in lines[j] and ";" not in head.split("{")[0] and \
                    not re.match(r"\s*(typedef|struct|union|enum|extern\s+\"C\"|static\s+const|const)\b", head) and \
                    "=" not in head.split("(")[0]:
                m = re.search(r"([A-Za-z_]\w*)\s*\(", head)
                name = m.group(1) if m else "?"
                t = re.match(r"\s*(Test|ParameterizedTest)\s*\(([^)]*)\)", head)
                if t:  # a Criterion test: named by its suite and name
                    name = f"{t.group(1)}({t.group(2).strip()})"
                depth, k = 0, j
                while k < len(lines):
                    depth += lines[k].count("{") - lines[k].count("}")
                    if depth <= 0 and "}" in lines[k]:
                        break
                    k += 1
                out.append((name, start + 1, k - start + 1))
                i = k + 1
                continue
        i += 1
    return out


def main():
    files = sorted({f for r in ROOTS for f in glob.glob(r, recursive=True)})
    bad, known, used = [], [], set()

    def report(key, text):
        if key in KNOWN:
            known.append(text)
            used.add(key)
        else:
            bad.append(text)

    for f in files:
        n = sum(1 for _ in open(f, errors="replace"))
        if n > MAX_FILE:
            report(f, f"{f}: {n} lines (over {MAX_FILE})")
        for name, line, length in functions(f):
            if length > MAX_FUNC and f"{f}:{name}" not in TABLES:
                report(f"{f}:{name}", f"{f}:{line}: {name} is {length} lines (over {MAX_FUNC})")
    for k in known:
        print("allowed for now: " + k)
    for k in sorted(set(KNOWN) - used):
        print(f"check-sizes: {k} is within the limits now: take it out of KNOWN")
    for b in bad:
        print(b)
    print(f"check-sizes: {len(files)} files, {len(bad)} violations, {len(known)} allowed for now (host/model/)")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
