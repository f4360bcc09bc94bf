"""DWI preprocessing steps on one real-size run: motion-correction metric and BLAS threads.

``python bench/bench_dwi_steps.py BASE`` where ``BASE`` is a DWI path without extension
(``.nii.gz``, ``.bval``, ``.bvec`` beside it), e.g. a session of
``trajectome-simulate --preset realistic``. Prints:

* per-volume time of DIPY's rigid MI registration with the dense masked metric and with
  ~75,000 sampled voxels (the default of ``pipeline.dwi.motion_correct``), and how far each
  is from a known 1.5 mm / 1.5 degree move applied to the volume (displacement at the
  corners of a 100 mm cube);
* MP-PCA on a 4-slice slab in child processes with 1 and 2 BLAS threads (run it beside
  another busy process to see the oversubscription the workflow avoids).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import nibabel as nb
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline import dwi
from pipeline.inputs import read_gradients

_SLAB = """
import sys, time, nibabel as nb, numpy as np
sys.path.insert(0, {root!r})
from pipeline import dwi
from pipeline.inputs import read_gradients
data = nb.load({base!r} + ".nii.gz").get_fdata(dtype=np.float32)
bvals, _ = read_gradients({base!r} + ".bval", {base!r} + ".bvec")
mask = dwi.brain_mask(data, bvals)
z = data.shape[2] // 2
slab = np.zeros_like(mask); slab[:, :, z:z + 4] = mask[:, :, z:z + 4]
t, c = time.perf_counter(), time.process_time()
dwi.mppca_denoise(data, slab, patch_radius=2)
print(f"{{int(slab.sum())}} centres: {{time.perf_counter() - t:.1f}} s wall, "
      f"{{time.process_time() - c:.1f}} CPU-s")
"""


def motion(base: str, n_volumes: int, seed: int) -> None:
    from dipy.align import affine_registration

    img = nb.load(base + ".nii.gz")
    data, aff = img.get_fdata(dtype=np.float32), img.affine
    bvals, _ = read_gradients(base + ".bval", base + ".bvec")
    mask = dwi.brain_mask(data, bvals).astype(np.int32)
    ref = data[..., bvals < 50].mean(-1).astype(np.float64)
    rng = np.random.default_rng(seed)
    dw = np.flatnonzero(bvals > 50)
    vols = dw[np.linspace(0, len(dw) - 1, n_volumes).astype(int)]
    centre = aff @ np.r_[np.array(data.shape[:3]) / 2, 1]
    corners = np.array([[centre[0] + sx * 50, centre[1] + sy * 50, centre[2] + sz * 50, 1]
                        for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
    moved = []
    for v in vols:
        axis = rng.normal(size=3)
        move = np.eye(4)
        rotvec = np.deg2rad(1.5) * axis / np.linalg.norm(axis)
        move[:3, :3] = Rotation.from_rotvec(rotvec).as_matrix()
        move[:3, 3] = rng.uniform(-1.5, 1.5, 3)
        vox = np.linalg.inv(aff) @ move @ aff
        moved.append((v, move, ndimage.affine_transform(data[..., v].astype(np.float64), vox,
                                                         order=3, mode="constant")))
    common = dict(moving_affine=aff, static_affine=aff, pipeline=["rigid"],
                  starting_affine=np.eye(4), sigmas=[2.0, 1.0, 0.0], factors=[4, 2, 1],
                  level_iters=[200, 100, 50])
    variants = {"dense, masked": {"static_mask": mask},
                "~75,000 sampled voxels": {"sampling_proportion": 75_000 / np.prod(data.shape[:3])}}
    for name, metric in variants.items():
        start, errors = time.perf_counter(), []
        for v, move, image in moved:
            volume = data[..., v].astype(np.float64)
            _, before = affine_registration(volume, ref, **common, **metric)
            _, after = affine_registration(image, ref, **common, **metric)
            # the moved volume's transform should be move^-1 @ the original's
            diff = after - np.linalg.inv(move) @ before
            errors.append(np.linalg.norm((corners @ diff.T)[:, :3], axis=1).max())
        per_volume = (time.perf_counter() - start) / (2 * len(moved))
        print(f"motion, {name}: {per_volume:.2f} s per volume; error under the known move "
              f"{', '.join(f'{e:.3f}' for e in errors)} mm", flush=True)


def blas(base: str) -> None:
    root = str(Path(__file__).resolve().parents[1])
    for threads in ("1", "2"):
        env = {**os.environ, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
               "MKL_NUM_THREADS": threads}
        out = subprocess.run([sys.executable, "-c", _SLAB.format(root=root, base=base)],
                             env=env, capture_output=True, text=True, check=True).stdout
        print(f"MP-PCA slab, {threads} BLAS thread(s): {out.strip()}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="DWI path without .nii.gz")
    parser.add_argument("--volumes", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.getLogger("dipy").setLevel(logging.WARNING)
    warnings.simplefilter("ignore")
    motion(args.base, args.volumes, args.seed)
    blas(args.base)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
