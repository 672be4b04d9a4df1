#!/usr/bin/python3
"""Candidate orders for AMX's TDPBF16PS, in exact rational arithmetic, against what the instruction
gave (dump.cpp's lines on stdin): the share of elements each order gets wrong.

Every product of two bf16 values is exact in fp32, so an order is which adds happen, in what
grouping, each rounded to fp32 (nearest even)."""
import math
import struct
import sys
from fractions import Fraction


def bf16(bits):
    return Fraction(struct.unpack("<f", struct.pack("<I", bits << 16))[0])


def rne(x):
    """x rounded to fp32, nearest even (no overflow or denormals at these magnitudes)."""
    if x == 0:
        return Fraction(0)
    m, e = math.frexp(abs(x))  # float approximation only to find the binade
    e -= 1
    while Fraction(2) ** e > abs(x):
        e -= 1
    while Fraction(2) ** (e + 1) <= abs(x):
        e += 1
    ulp = Fraction(2) ** (e - 23)
    q = abs(x) / ulp
    n = math.floor(q)
    r = q - n
    if r > Fraction(1, 2) or (r == Fraction(1, 2) and n % 2 == 1):
        n += 1
    return (1 if x > 0 else -1) * n * ulp


def chain(c, terms):
    for t in terms:
        c = rne(c + t)
    return c


def tree(terms):
    while len(terms) > 1:
        terms = [rne(terms[i] + terms[i + 1]) if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


ORDERS = {
    "fma chain, even depth first": lambda c, ev, od: chain(c, [t for p in zip(ev, od) for t in p]),
    "fma chain, odd depth first (vdpbf16ps)": lambda c, ev, od: chain(c, [t for p in zip(od, ev) for t in p]),
    "exact sum, rounded once": lambda c, ev, od: rne(c + sum(ev) + sum(od)),
    "each pair's sum rounded, added in order": lambda c, ev, od: chain(c, [rne(e + o) for e, o in zip(ev, od)]),
    "each lane a pairwise tree, c + (even + odd)": lambda c, ev, od: rne(c + rne(tree(ev) + tree(od))),
    "each lane in order, c + (even + odd) (AMX order)": lambda c, ev, od: rne(c + rne(chain(ev[0], ev[1:]) + chain(od[0], od[1:]))),
}


def main():
    wrong = dict.fromkeys(ORDERS, 0)
    n = 0
    for line in sys.stdin:
        f = line.split()
        c, got = Fraction(float.fromhex(f[0])), Fraction(float.fromhex(f[1]))
        v = list(map(int, f[2:]))
        ev = [bf16(v[i]) * bf16(v[i + 2]) for i in range(0, len(v), 4)]
        od = [bf16(v[i + 1]) * bf16(v[i + 3]) for i in range(0, len(v), 4)]
        for name, order in ORDERS.items():
            wrong[name] += order(c, ev, od) != got
        n += 1
    for name, count in wrong.items():
        print(f"{count / n:7.1%} of {n} differ: {name}")


if __name__ == "__main__":
    main()
