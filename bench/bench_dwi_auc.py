"""Planted-edge recovery of the diffusion connectome on every session of ds-ect (issue 5).

Per session of ``bids_examples/ds-ect``: the diffusion workflow
(:func:`workflows.dwi.init_dwi_wf` with its default tracking options and ``--sloppy``
preprocessing; anatomy from the ground truth, :mod:`pipeline.simulate.qsiprep`) at
``--streamlines``, and the ROC AUC separating planted from absent edges by streamline count
(upper triangle; planted = bundle count > 0; ties count half).  Then only the tracking is
repeated, from the same FODs and tissue maps, once per ``--variant`` (``KEY=VALUE`` inputs
of :class:`workflows.interfaces.dwi.TrackConnectomes`), so settings are compared on
identical data; the variant ``seed=7`` gives the seed-to-seed correlation of the counts.
A rerun with the same ``--work`` reuses the preprocessing (Nipype cache)::

    nice -n 10 python bench/bench_dwi_auc.py --streamlines 50000 --work /tmp/dwi_auc

``--correlation SUB/SES --correlation-streamlines N`` also tracks that session with seeds
42 and 7 at ``N`` streamlines and prints the correlation of the two count matrices.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_dwi import ATLAS, ECT, planted_auc, retrack, run_session  # noqa: E402

DEFAULT_VARIANTS = ("seed=7", "stopping=cmc", "stopping=act", "fa_threshold=0.1",
                    "assignment_radius=2")


def parse_variant(text: str) -> dict[str, object]:
    """``"stopping=cmc"`` -> ``{"stopping": "cmc"}``; numbers become int/float, none -> None."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"variant {text!r}: write KEY=VALUE, e.g. stopping=cmc")
    parsed: object = value
    if value.lower() == "none":
        parsed = None
    else:
        for cast in (int, float):
            try:
                parsed = cast(value)
                break
            except ValueError:
                pass
    return {key: parsed}


def count_correlation(a: str | Path, b: str | Path) -> float:
    """Pearson correlation of two streamline-count relmats over the upper triangle."""
    x = pd.read_csv(a, sep="\t", index_col="Node").to_numpy()
    y = pd.read_csv(b, sep="\t", index_col="Node").to_numpy()
    upper = np.triu_indices(len(x), 1)
    return float(np.corrcoef(x[upper], y[upper])[0, 1])


def sessions() -> list[tuple[str, str]]:
    return [(sub.name[4:], ses.name[4:]) for sub in sorted(ECT.glob("sub-*"))
            for ses in sorted(sub.glob("ses-*"))]


def truth_of(sub: str, ses: str) -> Path:
    return (ECT / "derivatives" / "groundtruth" / f"sub-{sub}" / f"ses-{ses}" / "dwi"
            / f"sub-{sub}_ses-{ses}_atlas-{ATLAS}_desc-planted_stat-bundlecount_relmat.tsv")


def bench_session(sub: str, ses: str, args: argparse.Namespace) -> dict[str, object]:
    work = Path(args.work)
    start = time.perf_counter()
    wf_dir = run_session(ECT, sub, ses, work, n_streamlines=args.streamlines, sloppy=True,
                         seed=42, omp_nthreads=args.threads)
    row: dict[str, object] = {"subject": sub, "session": ses,
                              "workflow_s": round(time.perf_counter() - start, 1)}
    relmat = (work / "out" / f"sub-{sub}" / f"ses-{ses}" / "dwi"
              / f"sub-{sub}_ses-{ses}_space-T1w_atlas-{ATLAS}_stat-streamlinecount_relmat.tsv")
    meta = json.loads(relmat.with_suffix(".json").read_text())
    row["fa_threshold"] = meta.get("FAThreshold")
    row["auc"], row["planted"], row["hit"] = planted_auc(relmat, truth_of(sub, ses))
    for text in args.variant:
        option = parse_variant(text)
        start = time.perf_counter()
        path = retrack(wf_dir, work, work / f"anat_{sub}_{ses}", n_streamlines=args.streamlines,
                       num_threads=args.threads, **{"seed": 42, **option})
        label = text.replace("=", ":")
        if "seed" in option:
            row[f"r[{label}]"] = count_correlation(relmat, path)
        else:
            row[f"auc[{label}]"], _, row[f"hit[{label}]"] = planted_auc(path, truth_of(sub, ses))
        row[f"s[{label}]"] = round(time.perf_counter() - start, 1)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streamlines", type=int, default=50_000)
    parser.add_argument("--work", default="/tmp/dwi_bench_auc")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variant", nargs="*", default=list(DEFAULT_VARIANTS),
                        help="KEY=VALUE TrackConnectomes inputs to compare (default: %(default)s)")
    parser.add_argument("--sessions", nargs="*",
                        help="SUB/SES to run (default: all nine; none given: only --correlation)")
    parser.add_argument("--correlation", help="SUB/SES for the large-count seed correlation")
    parser.add_argument("--correlation-streamlines", type=int, default=500_000)
    args = parser.parse_args(argv)
    for text in args.variant:
        parse_variant(text)  # fail before hours of tracking
    todo = sessions() if args.sessions is None else [tuple(s.split("/")) for s in args.sessions]
    rows = []
    for sub, ses in todo:
        rows.append(bench_session(sub, ses, args))
        print(json.dumps(rows[-1]), flush=True)
    if rows:
        table = pd.DataFrame(rows)
        columns = [c for c in table if c.startswith(("auc", "hit", "r["))] + ["fa_threshold"]
        print(table[["subject", "session", *columns]].to_string(
            index=False, float_format=lambda v: f"{v:.3f}"))
        print("minimum over sessions:", json.dumps(
            {c: round(float(table[c].min()), 3) for c in columns if c.startswith(("auc", "r["))}))
    if args.correlation:
        sub, ses = args.correlation.split("/")
        work = Path(args.work)
        wf_dir = work / "wk" / f"dwi_{sub}_{ses}_wf"
        if not wf_dir.exists():
            wf_dir = run_session(ECT, sub, ses, work, n_streamlines=args.streamlines,
                                 sloppy=True, seed=42, omp_nthreads=args.threads)
        n = args.correlation_streamlines
        start = time.perf_counter()
        paths = [retrack(wf_dir, work, work / f"anat_{sub}_{ses}", n_streamlines=n, seed=seed,
                         num_threads=args.threads) for seed in (42, 7)]
        auc = [planted_auc(p, truth_of(sub, ses))[0] for p in paths]
        print(f"{sub} {ses}: {n} streamlines, seed 42 vs 7: r = "
              f"{count_correlation(*paths):.4f}; AUC {auc[0]:.3f} / {auc[1]:.3f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
