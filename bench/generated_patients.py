"""Where the generated data's nodules come from: malignancy classes by the methods' rule
and, for a held-out fold, how many of its nodules share an LIDC patient (or the very
library nodule) with the training scans.

    python bench/generated_patients.py --data data_cache/synthetic_default_seed0_v2/luna16 \
        [--fold 0]

Reads the dataset's ``malignancy.csv`` and ``subset*/`` folders; prints one table.
"""

import argparse
import glob
import os

import numpy as np

from lungjax.data.sampler import malignant_label
from lungjax.data.synthetic import read_malignancy_csv


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a generated dataset's luna16 folder")
    p.add_argument("--fold", type=int, default=0, help="the held-out subset")
    a = p.parse_args(argv)
    cols = read_malignancy_csv(os.path.join(a.data, "malignancy.csv"))
    subset = {os.path.basename(f)[:-4]: int(os.path.basename(os.path.dirname(f))[6:])
              for f in glob.glob(os.path.join(a.data, "subset*", "*.mhd"))}
    fold = np.array([subset[u] for u in cols["seriesuid"]])
    lab = malignant_label(cols["malignancy"], "exclude")
    held, train = fold == a.fold, fold != a.fold
    patients = set(cols["lidc_patient_id"][train])
    library = set(cols["library_index"][train])
    print("| figure | value |\n|---|---|")
    rows = [
        ("nodules", len(lab)),
        ("library nodules / LIDC patients they come from",
         f"{len(set(cols['library_index']))} / {len(set(cols['lidc_patient_id']))}"),
        ("benign / malignant / left out (median 3, 2.5, 3.5)",
         f"{(lab == 0).sum()} / {(lab == 1).sum()} / {(lab < 0).sum()}"),
        (f"held-out (subset {a.fold}) nodules", int(held.sum())),
        ("... whose LIDC patient also gave a training nodule",
         int(np.isin(cols["lidc_patient_id"][held], list(patients)).sum())),
        ("... that are a library nodule a training scan also holds",
         int(np.isin(cols["library_index"][held], list(library)).sum())),
    ]
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
