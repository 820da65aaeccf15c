#!/usr/bin/env python3
"""Fail when a module imports another that (through others) imports it back, or when a
non-test source file grows past 800 lines. Reads `use` and paths from the source text, per
crate; test modules (`#[cfg(test)]` to the end of the file) are left out."""
import os, re, sys

LIMIT = 800
ROOTS = [p for p in (".", "crates/sluice-core", "bench") if os.path.isdir(os.path.join(p, "src"))]


def strip(text):
    out = []
    for line in text.splitlines():
        if re.match(r"\s*#\[cfg\(test\)\]", line):
            break
        out.append(re.sub(r"//.*", "", line))
    return "\n".join(out)


def crate(root):
    src = os.path.join(root, "src")
    files = {}
    for d, _, names in os.walk(src):
        for n in names:
            if n.endswith(".rs"):
                rel = os.path.relpath(os.path.join(d, n), src)[:-3].split(os.sep)
                if rel[-1] in ("mod", "lib", "main"):
                    rel = rel[:-1]
                files[tuple(rel)] = os.path.join(d, n)
    return files


def resolve(path, files):
    """The longest module prefix of `path` that is a file."""
    for n in range(len(path), 0, -1):
        if tuple(path[:n]) in files:
            return tuple(path[:n])
    return None


failed = False
for root in ROOTS:
    files = crate(root)
    edges = {m: set() for m in files}
    for mod, path in files.items():
        text = strip(open(path).read())
        for m in re.finditer(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)+)", text):
            parts = m.group(2).split("::")[1:]
            if m.group(1) == "crate":
                target = parts
            else:
                base = list(mod[:-1]) if not path.endswith("mod.rs") else list(mod)
                target = base[:-1] + parts if path.endswith("mod.rs") else base + parts
            t = resolve(target, files)
            if t is not None and t != mod and not (len(t) < len(mod) and mod[: len(t)] == t):
                edges[mod].add(t)
        lines = len(text.splitlines())
        if lines > LIMIT:
            print(f"{path}: {lines} lines of non-test code (limit {LIMIT})")
            failed = True
    # Tarjan's strongly connected components.
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(comp)

    sys.setrecursionlimit(10000)
    for v in list(edges):
        if v not in index:
            visit(v)
    for comp in sccs:
        print(f"{root}: import circle: " + ", ".join(files[m] for m in sorted(comp)))
        failed = True

if failed:
    sys.exit(1)
print("no import circles; no source file over", LIMIT, "lines")
