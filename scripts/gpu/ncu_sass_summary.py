"""Summarise an ncu per-instruction SASS export (``ncu -i R --page source --csv --print-source sass``).

usage: python scripts/gpu/ncu_sass_summary.py source_sass.csv KERNEL_INDEX
Prints the kernel's warp-stall reasons (share of all samples) and its instructions grouped by execution count
(instructions run the same number of times form one loop body or straight-line part), with each group's share of the
stall samples and its most frequent opcodes.
"""

import collections
import csv
import sys


def main() -> None:
    kernels, cur = [], None
    for line in open(sys.argv[1]).read().split("\n"):
        if line.startswith('"Kernel Name"'):
            cur = [line]
            kernels.append(cur)
        elif cur is not None and line:
            cur.append(line)
    block = kernels[int(sys.argv[2])]
    header, *rows = list(csv.reader(block[1:]))
    samples = header.index("Warp Stall Sampling (All Samples)")
    executed = header.index("Instructions Executed")
    stalls = [i for i, h in enumerate(header) if h.startswith("stall_") and "Not Issued" not in h]
    reasons = collections.Counter()
    groups = collections.defaultdict(lambda: [0, 0, collections.Counter()])
    for r in rows:
        for i in stalls:
            reasons[header[i]] += int(r[i] or 0)
        words = r[1].strip().split() or ["?"]
        op = (words[1] if words[0].startswith("@") and len(words) > 1 else words[0]).split(".")[0]
        g = groups[int(r[executed] or 0)]
        g[0] += 1
        g[1] += int(r[samples] or 0)
        g[2][op] += 1
    total = sum(reasons.values())
    print(block[0], "stall samples", total)
    for name, n in reasons.most_common(10):
        print(f"  {name:24s} {100 * n / total:5.1f} %")
    for count, (n_ins, n_samples, ops) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:6]:
        print(f"  executed {count:>9d}: {n_ins:4d} instructions, {100 * n_samples / total:5.1f} % of samples, "
              f"{dict(ops.most_common(8))}")


if __name__ == "__main__":
    main()
