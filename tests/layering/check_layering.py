#!/usr/bin/python3
"""Every #include in src/ points down the layers (src/CMakeLists.txt): a layer includes only
itself and the layers below it, and above kernels/ only the backend seam (kernels/backend.h),
never a CPU kernel directly. Prints each violation with file:line; exit 1 if any.

Run: /usr/bin/python3 tests/layering/check_layering.py
"""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SRC = os.path.join(ROOT, "src")

# layer -> the layers it may include (itself included)
ALLOWED = {
    "core": {"core"},
    "kernels": {"kernels", "core"},
    "comm": {"comm", "core"},
    "sched": {"sched", "core"},
    "moe": {"moe", "sched", "comm", "kernels", "core"},
    "perf": {"perf", "moe", "sched", "comm", "kernels", "core"},
    "model": {"model", "perf", "moe", "sched", "comm", "kernels", "core"},
}
SEAM = "kernels/backend.h"  # what layers above kernels may include of it
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')


def main():
    problems, checked = [], 0
    for layer in sorted(os.listdir(SRC)):
        folder = os.path.join(SRC, layer)
        if not os.path.isdir(folder):
            continue
        if layer not in ALLOWED:
            problems.append(f"src/{layer}/: a folder that is no layer of src/CMakeLists.txt")
            continue
        for base, _, files in os.walk(folder):
            for name in sorted(files):
                path = os.path.join(base, name)
                rel = os.path.relpath(path, ROOT)
                for number, line in enumerate(open(path, encoding="utf-8"), 1):
                    m = INCLUDE.match(line)
                    if not m:
                        continue
                    checked += 1
                    target = m.group(1)
                    target_layer = target.split("/")[0]
                    if target_layer not in ALLOWED:
                        continue  # a header of a library
                    if target_layer not in ALLOWED[layer]:
                        problems.append(f"{rel}:{number}: {layer}/ includes {target}, a layer above it")
                    elif target_layer == "kernels" and layer != "kernels" and target != SEAM:
                        problems.append(f"{rel}:{number}: {layer}/ includes {target}: above kernels/ only {SEAM}")
    for p in problems:
        print("LAYERING:", p)
    print(f"check_layering: {checked} includes checked, {len(problems)} violations")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
