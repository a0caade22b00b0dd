"""Write a small hospital-like export of phantom studies for `make demo` (until the full
synthetic archive of issue 3 replaces it): CT axial, CT gantry-tilted, MR sagittal T2,
a localizer and a stray text file, with made-up identifiers."""

from __future__ import annotations

import os
import sys

import pydicom

from neurovfm.synth.dicom_writer import Identity, SeriesSpec
from neurovfm.synth.phantom import write_phantom_series


def main(out: str) -> None:
    a = Identity(patient_name="DEMO^ALICE", patient_id="DEMO0001", study_uid=pydicom.uid.generate_uid(entropy_srcs=["a"]))
    b = Identity(patient_name="DEMO^BOB", patient_id="DEMO0002", age="034Y", sex="M",
                 study_description="MRI BRAIN", study_uid=pydicom.uid.generate_uid(entropy_srcs=["b"]))
    kw = dict(rows=256, cols=256, ps=(0.8, 0.8))
    write_phantom_series(os.path.join(out, "PAT1", "CT1"), "axial", n=36, step=4.0, identity=a, shuffle=True,
                         spec=SeriesSpec(series_description="HEAD 4mm", kernel="H30s", series_number=2), **kw)
    write_phantom_series(os.path.join(out, "PAT1", "CT2"), "axial", n=36, step=4.0, identity=a, tilt_deg=15,
                         spec=SeriesSpec(series_description="HEAD BONE tilt", kernel="H70h", series_number=3), **kw)
    write_phantom_series(os.path.join(out, "PAT1", "SCOUT"), "sagittal", n=2, step=4.0, identity=a,
                         spec=SeriesSpec(series_description="Topogram", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                                         series_number=1), **kw)
    write_phantom_series(os.path.join(out, "PAT2", "MR1"), "sagittal", n=30, step=5.0, identity=b, modality="MR",
                         spec=SeriesSpec(modality="MR", series_description="SAG T2 TSE", repetition_time=4000.0,
                                         echo_time=100.0, series_number=4), filenames=[f"{k:08d}" for k in range(30)], **kw)
    with open(os.path.join(out, "README.TXT"), "w") as fh:
        fh.write("export notes\n")
    print(f"demo source written to {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo-out/source")
