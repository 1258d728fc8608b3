"""Structure numbers for the closing note: lines per package, function-level project imports, longest functions."""

import ast
import collections
import pathlib
import sys

root = pathlib.Path(sys.argv[1])
files = [p for d in ("lm", "sharding", "launch", "recipes") for p in (root / d).rglob("*.py")]
per = collections.Counter()
for p in files:
    rel = p.relative_to(root)
    key = (
        "/".join(rel.parts[:2])
        if rel.parts[0] == "lm" and len(rel.parts) > 2
        else (rel.parts[0] + "/" + rel.name if rel.parts[0] == "lm" else rel.parts[0])
    )
    per[key] += len(p.read_text().splitlines())
print("total", sum(per.values()))
for k, v in sorted(per.items()):
    print(f"  {k}: {v}")
inner, funcs = [], []
for p in files:
    tree = ast.parse(p.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            funcs.append((node.end_lineno - node.lineno + 1, f"{p.relative_to(root)}:{node.lineno} {node.name}"))
            for sub in ast.walk(node):
                if (
                    isinstance(sub, ast.ImportFrom)
                    and sub.module
                    and sub.module.split(".")[0] in ("lm", "sharding", "launch", "recipes")
                ):
                    inner.append(f"{p.relative_to(root)}:{sub.lineno} from {sub.module}")
                elif isinstance(sub, ast.Import) and any(
                    a.name.split(".")[0] in ("lm", "sharding", "launch", "recipes") for a in sub.names
                ):
                    inner.append(f"{p.relative_to(root)}:{sub.lineno} import {sub.names[0].name}")
inner = sorted(set(inner))
print("function-level project imports:", len(inner))
for i in inner:
    print("  ", i)
print("five longest functions:")
for n, name in sorted(funcs, reverse=True)[:5]:
    print(f"  {n} {name}")
