#!/usr/bin/env python3
# Usage: python3 scripts/module-cycles.py [SRC_DIR] [DEPTH]  (DEPTH 1: top-level modules)
"""Module dependency cycles in a Rust crate: which top-level module (or
file-level module, with --files) refers to which via `crate::` paths."""
import os, re, sys, itertools
root = sys.argv[1] if len(sys.argv) > 1 else 'src'
depth = int(sys.argv[2]) if len(sys.argv) > 2 else 1
def modname(path):
    rel = os.path.relpath(path, root)[:-3].split('/')
    if rel[-1] == 'mod': rel = rel[:-1]
    if rel in (['lib'], ['main']): return None
    return '::'.join(rel[:depth])
edges = {}
for d, _, files in os.walk(root):
    for f in files:
        if not f.endswith('.rs'): continue
        p = os.path.join(d, f)
        m = modname(p)
        if m is None or os.path.relpath(p, root).startswith('bin'): continue
        src = open(p).read()
        # drop tests modules
        src = src.split('#[cfg(test)]\nmod tests')[0]
        refs = set()
        for u in re.finditer(r'crate::((?:\w+::)*\w+)', src):
            refs.add('::'.join(u.group(1).split('::')[:depth]))
        for u in re.finditer(r'use crate::\{([^;]*)\};', src, re.S):
            for part in re.split(r',\s*', u.group(1)):
                part = part.strip().split('::')
                if part[0]: refs.add('::'.join(part[:depth]))
        # super:: within same top module at depth 1 is internal
        edges.setdefault(m, set()).update(r for r in refs if r != m and not r.startswith(m + '::'))
mods = sorted(edges)
# find strongly connected components (Tarjan)
index = {}; low = {}; stack = []; on = set(); sccs = []; i = [0]
def strong(v):
    index[v] = low[v] = i[0]; i[0] += 1; stack.append(v); on.add(v)
    for w in edges.get(v, ()):
        if w not in edges: continue
        if w not in index: strong(w); low[v] = min(low[v], low[w])
        elif w in on: low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        c = []
        while True:
            w = stack.pop(); on.discard(w); c.append(w)
            if w == v: break
        if len(c) > 1: sccs.append(sorted(c))
sys.setrecursionlimit(10000)
for v in mods:
    if v not in index: strong(v)
pairs = [(a, b) for a in mods for b in edges[a] if b in edges and a in edges.get(b, ()) and a < b]
print(f"{len(mods)} modules, {sum(len(e) for e in edges.values())} edges")
print("mutual imports:", pairs or "none")
print("cycles:", sccs or "none")
