"""The predict command on one scan in every input format it reads: seconds per scan and
whether the marks agree.

    python bench/predict_formats.py --model=runs/dou2017/export --scan=SCAN.mhd

The scan is written again, with SimpleITK, as .mha, .nii.gz and a DICOM series (one
int16 slice per file, ImagePositionPatient / ImageOrientationPatient / PixelSpacing set)
in a temporary folder; ``python -m lungjax.detect`` runs on each in a fresh process (so
each row pays its own start and compilation, as a user's command does) and the table gives
the command's wall-clock seconds, the per-step seconds it records in predict.json and the
largest distance from each format's marks to the .mhd's. Every format gets the same lung
mask (the LUNA16 ``seg-lungs-LUNA16`` mask the command finds beside a LUNA16-layout .mhd,
passed as ``--lung-mask``); a last row runs the .mhd with the threshold lung mask instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import SimpleITK as sitk

from lungjax.data.io import read_scan, write_dicom_series
from lungjax.data.tables import read_marks_csv


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the folder --mode=export printed")
    p.add_argument("--scan", required=True, help="a .mhd scan")
    args = p.parse_args()
    uid = os.path.basename(args.scan)[:-len(".mhd")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        image = sitk.ReadImage(args.scan)
        inputs = {".mhd": args.scan}
        for ext in (".mha", ".nii.gz"):
            inputs[ext] = os.path.join(tmp, uid + ext)
            sitk.WriteImage(image, inputs[ext])
        inputs["DICOM"] = os.path.join(tmp, uid)
        scan = read_scan(args.scan)
        write_dicom_series(inputs["DICOM"], scan.array, scan.geometry)
        del scan
        from lungjax.detect import find_lung_mask

        mask = find_lung_mask(args.scan, None, 1)
        runs = [(name, path, mask) for name, path in inputs.items()]
        if mask:
            threshold_copy = os.path.join(tmp, "threshold", uid + ".mha")
            os.makedirs(os.path.dirname(threshold_copy))
            sitk.WriteImage(image, threshold_copy)
            runs.append((".mhd, threshold lung mask", threshold_copy, None))
        ref = None
        for name, path, lung in runs:
            out = os.path.join(tmp, "out_" + str(len(rows)))
            t0 = time.perf_counter()
            cmd = [sys.executable, "-m", "lungjax.detect", f"--model={args.model}",
                   f"--scan={path}", f"--out={out}"] + ([f"--lung-mask={lung}"] if lung else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise SystemExit(f"{name}: exit {proc.returncode}: {proc.stderr[-2000:]}")
            with open(os.path.join(out, "predict.json"), encoding="utf-8") as f:
                rec = json.load(f)["scans"][uid]
            marks = read_marks_csv(os.path.join(out, "submission.csv"))
            if ref is None:
                ref = marks
            gap = (max(float(np.linalg.norm(ref.xyz - m, axis=1).min()) for m in marks.xyz)
                   if len(marks) and len(ref) else 0.0)
            rows.append((name, len(marks), wall, rec["seconds"], gap,
                         sorted(os.listdir(out))))
    print(f"lung mask: {mask or 'threshold'}")
    print(f"{'input':26} {'marks':>5} {'command s':>9} {'read':>6} {'prep':>6} {'detect':>7} "
          f"{'total':>6}  max mm to .mhd marks")
    for name, n, wall, sec, gap, _ in rows:
        print(f"{name:26} {n:5d} {wall:9.1f} {sec['read']:6.1f} {sec['preprocess']:6.1f} "
              f"{sec['detect']:7.1f} {sec['total']:6.1f}  {gap:.3f}")
    print("outputs:", ", ".join(rows[0][5]))


if __name__ == "__main__":
    main()
