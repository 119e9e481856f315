"""Wall time of ``HeadTree.load`` for a 4-head tree (5 loads after one warm-up; min and median).

    python benchmarks/load.py resnet50 layer3,layer4 224 [--verify]
"""
import statistics
import sys
import tempfile
import time

import headsurgeon as hs

name, at, side = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
extra = {"verify": True} if "--verify" in sys.argv else {}  # older versions had no verify argument
tree = hs.split(name, at=at, heads=4, num_classes=10, seed=0, input_size=(3, side, side))
with tempfile.TemporaryDirectory() as d:
    tree.save(f"{d}/t")
    hs.HeadTree.load(f"{d}/t", **extra)
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        hs.HeadTree.load(f"{d}/t", **extra)
        ts.append(time.perf_counter() - t)
print(f"{name} load{' verify=True' if extra else ''}: min {min(ts):.3f} s, median {statistics.median(ts):.3f} s")
