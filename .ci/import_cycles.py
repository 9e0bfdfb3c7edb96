#!/usr/bin/env python3
"""Fails if the top-level modules of a crate import each other in a circle.

For each crate's `src/`, every file belongs to a top-level module (its first
path component); a `crate::x` path in it is an edge to module `x` (comments
and `#[cfg(test)]` files named tests.rs are ignored). Any strongly connected
component of more than one module is a circle, printed with its members.
"""
import os
import re
import sys

CRATES = ["server/src", "client/src", "proto/src", "src", "loadtest/src"]


def edges(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".rs") or f == "tests.rs":
                continue
            path = os.path.join(d, f)
            top = os.path.relpath(path, root).split(os.sep)[0].removesuffix(".rs")
            text = re.sub(r"//[^\n]*", "", open(path, errors="replace").read())
            # Unit tests inside a file (`mod tests { ... }` at the end) may
            # reach anywhere; cut them off.
            text = text.split("#[cfg(test)]\nmod tests")[0]
            out.setdefault(top, set()).update(set(re.findall(r"crate::(\w+)", text)) - {top})
    return out


def sccs(graph):
    index, low, stack, on, result, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
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
            result.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return result


bad = False
for root in CRATES:
    if not os.path.isdir(root):
        continue
    for comp in sccs(edges(root)):
        if len(comp) > 1:
            bad = True
            print(f"{root}: modules import each other in a circle: {' <-> '.join(sorted(comp))}")
if bad:
    sys.exit(1)
print("no import circles between modules")
