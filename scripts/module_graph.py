#!/usr/bin/env python3
"""The controller crate's module graph, read from its `use crate::` paths (test code left out):
the layers each top-level module of src/ names, the cycles between any two modules (files), and
the functions over a length. Usage: scripts/module_graph.py [SRC_DIR] [MAX_FN_LINES]
(tests/layers.rs enforces the layer order; this prints the whole picture)."""
import os
import re
import sys

SRC = sys.argv[1] if len(sys.argv) > 1 else "src"
MAX_FN = int(sys.argv[2]) if len(sys.argv) > 2 else 80


def code_files():
    for d, _, fs in os.walk(SRC):
        for f in sorted(fs):
            if f.endswith(".rs") and not f.endswith("_tests.rs") and f not in ("tests.rs", "testing.rs"):
                path = os.path.join(d, f)
                text = open(path).read()
                cut = text.find("#[cfg(test)]")
                yield path, text[:cut] if cut >= 0 else text


def module_of(path):
    rel = os.path.relpath(path, SRC)[:-3].split(os.sep)
    if rel[-1] == "mod":
        rel = rel[:-1]
    return "::".join(rel)


def strong_components(edges):
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    sys.setrecursionlimit(10000)

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
            out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [c for c in out if len(c) > 1]


def long_functions(path, text):
    lines, i, out = text.split("\n"), 0, []
    while i < len(lines):
        if re.match(r"\s*(pub(\([^)]*\))?\s+)?(async\s+)?fn\s+\w+", lines[i]):
            depth, j, started = 0, i, False
            while j < len(lines):
                depth += lines[j].count("{") - lines[j].count("}")
                started = started or "{" in lines[j]
                if (started and depth <= 0) or (not started and lines[j].rstrip().endswith(";")):
                    break
                j += 1
            if started and j - i + 1 > MAX_FN:
                name = re.search(r"fn\s+(\w+)", lines[i]).group(1)
                out.append((j - i + 1, f"{os.path.relpath(path, SRC)}:{i + 1} {name}"))
            i = j + 1
        else:
            i += 1
    return out


files = dict((module_of(p), (p, t)) for p, t in code_files())
modules = set(files) - {"lib", "main"}
layer_edges = {m.split("::")[0]: set() for m in modules}
file_edges = {m: set() for m in modules}
longest = []
for m in modules:
    path, text = files[m]
    for named in re.findall(r"(?<![A-Za-z0-9_])crate::([a-z_][a-z0-9_]*(?:::[a-z_][a-z0-9_]*)*)", text):
        parts = named.split("::")
        if parts[0] != m.split("::")[0]:
            layer_edges[m.split("::")[0]].add(parts[0])
        for k in range(len(parts), 0, -1):
            target = "::".join(parts[:k])
            if target in modules and target != m and not m.startswith(target + "::"):
                file_edges[m].add(target)
                break
    longest += long_functions(path, text)

print("layers (each -> what it names):")
for layer in sorted(layer_edges):
    print(f"  {layer} -> {' '.join(sorted(layer_edges[layer])) or '-'}")
layer_cycles = strong_components({k: {x for x in v if x in layer_edges} for k, v in layer_edges.items()})
file_cycles = strong_components(file_edges)
print(f"cycles between layers: {len(layer_cycles)}" + "".join(f"\n  {' '.join(c)}" for c in layer_cycles))
print(f"cycles between modules ({len(modules)} read): {len(file_cycles)}" + "".join(f"\n  {' '.join(c)}" for c in file_cycles))
longest.sort(reverse=True)
print(f"functions over {MAX_FN} lines: {len(longest)}" + "".join(f"\n  {where} ({n})" for n, where in longest))
