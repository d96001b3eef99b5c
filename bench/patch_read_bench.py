"""Random patch reads per second from a patch store.

    python bench/patch_read_bench.py [--store DIR] [--scans 4] [--seconds 5]

Without --store, builds a temporary store: the 512 x 512 x 300 synthetic chest of
bench/preprocess_bench.py, preprocessed to 1 mm and written (32^3 chunks, blosc-zstd)
under ``--scans`` UIDs. Then, for each patch size (z, y, x) = 96^3, 10x30x30 and
24x60x60, reads patches at random centres inside the volumes for ``--seconds`` from
one calling thread (tensorstore decodes chunks on its own thread pool), with the chunk
cache off (every read decompresses: the cold-cache rate) and with the default 256 MiB
cache.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SIZES = ((96, 96, 96), (10, 30, 30), (24, 60, 60))


def build_store(out: str, n_scans: int) -> None:
    from preprocess_bench import make_scan

    from lungjax.data import store as S
    from lungjax.data.io import read_scan
    from lungjax.data.preprocess import preprocess_scan

    with tempfile.TemporaryDirectory() as tmp:
        make_scan(os.path.join(tmp, "b.mhd"))
        scan = read_scan(os.path.join(tmp, "b.mhd"))
    pre = preprocess_scan(scan.array, scan.geometry)
    del scan
    scans = {}
    z3 = np.zeros((0, 3))
    for i in range(n_scans):
        uid = f"bench.{i}"
        S.write_scan_arrays(out, uid, {"image": pre.image, "lung": pre.lung})
        scans[uid] = S.ScanRecord(
            uid=uid, fold=i % 10, shape_zyx=pre.image.shape, geometry=pre.geometry,
            arrays=("image", "lung"), nodules_zyx=z3, nodules_world=z3,
            nodule_diameter_mm=np.zeros(0), dropped_world=z3, dropped_diameter_mm=np.zeros(0),
            excluded_zyx=z3, excluded_world=z3, excluded_diameter_mm=np.zeros(0),
            candidates_zyx=z3, candidates_world=z3, candidates_label=np.zeros(0, int),
            transforms=pre.transforms()).to_json()
    S.write_manifest(out, {"format": S.STORE_FORMAT, "version": S.STORE_VERSION,
                           "spacing_zyx": [1.0, 1.0, 1.0], "hu_window": [-1200.0, 600.0],
                           "scans": scans})


def bench(store_path: str, cache_bytes: int, size, seconds: float, seed: int = 0) -> float:
    from lungjax.data.store import PatchStore

    st = PatchStore.open(store_path, cache_bytes=cache_bytes)
    uids = st.uids()
    rng = np.random.default_rng(seed)
    st.read_patch(uids[0], np.asarray(st.scan(uids[0]).shape_zyx) // 2, size)  # open handles
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        uid = uids[rng.integers(len(uids))]
        shape = np.asarray(st.scan(uid).shape_zyx)
        st.read_patch(uid, rng.integers(0, shape), size)
        n += 1
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default=None, help="existing store (default: build one)")
    p.add_argument("--scans", type=int, default=4)
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.store
        if path is None:
            path = os.path.join(tmp, "store")
            t = time.perf_counter()
            build_store(path, args.scans)
            print(f"built a {args.scans}-scan store in {time.perf_counter() - t:.1f} s")
        from lungjax.data.store import PatchStore

        st = PatchStore.open(path)
        rec = st.scans[0]
        mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in
                 os.walk(os.path.join(path, "scans", rec.uid, "image")) for f in fs) / 2**20
        print(f"scan shape {rec.shape_zyx}, image {mb:.1f} MiB compressed "
              f"({np.prod(rec.shape_zyx) / 2**20:.1f} MiB raw)")
        for size in SIZES:
            cold = bench(path, 0, size, args.seconds)
            warm = bench(path, 256 << 20, size, args.seconds)
            print(f"patch {'x'.join(map(str, size)):9s} (z,y,x): {cold:8.1f} reads/s no cache, "
                  f"{warm:8.1f} reads/s with 256 MiB cache (one calling thread)")


if __name__ == "__main__":
    main()
