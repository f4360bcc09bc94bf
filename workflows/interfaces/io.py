"""Interfaces that check inputs and write tables and derivatives."""

from __future__ import annotations

import filecmp
import shutil
from pathlib import Path

import pandas as pd
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from pipeline import derivatives, inputs


class _CheckInputInputSpec(BaseInterfaceInputSpec):
    modality = traits.Enum("anat", "func", "dwi", mandatory=True)
    in_file = File(exists=True, mandatory=True)
    metadata = traits.Dict(desc="BIDS sidecar metadata")
    bval = File(exists=True)
    bvec = File(exists=True)


class _CheckInputOutputSpec(TraitedSpec):
    summary = traits.Dict(desc="shape, zooms, TR/shells and warnings")
    out_file = File(exists=True, desc="the checked file, passed on")


class CheckInput(SimpleInterface):
    """Load one input file fully and check it (see :mod:`pipeline.inputs`)."""

    input_spec = _CheckInputInputSpec
    output_spec = _CheckInputOutputSpec

    def _run_interface(self, runtime):
        spec = self.inputs
        checks = {
            "anat": lambda: inputs.check_t1w(spec.in_file),
            "func": lambda: inputs.check_bold(spec.in_file, spec.metadata),
            "dwi": lambda: inputs.check_dwi(spec.in_file, spec.bval, spec.bvec),
        }
        summary = checks[spec.modality]()
        self._results["summary"] = summary.as_dict()
        self._results["out_file"] = spec.in_file
        return runtime


class _TableInputSpec(BaseInterfaceInputSpec):
    records = traits.List(traits.Dict, mandatory=True, desc="one dict per row")
    columns = traits.List(traits.Str, mandatory=True, desc="column order")
    out_name = traits.Str("table.tsv", usedefault=True)


class _FileOutputSpec(TraitedSpec):
    out_file = File(exists=True)


class RecordsToTSV(SimpleInterface):
    """Write a list of records as a BIDS TSV in the node directory."""

    input_spec = _TableInputSpec
    output_spec = _FileOutputSpec

    def _run_interface(self, runtime):
        table = pd.DataFrame.from_records(self.inputs.records, columns=self.inputs.columns)
        out = Path(runtime.cwd) / self.inputs.out_name
        derivatives.write_tsv(out, table)
        self._results["out_file"] = str(out)
        return runtime


class _DerivativesSinkInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    base_directory = traits.Directory(mandatory=True, desc="the derivatives root")
    entities = traits.Dict(mandatory=True, desc="BIDS entities of the output name")
    suffix = traits.Str(mandatory=True)
    extension = traits.Str(mandatory=True, desc="with leading dot")
    datatype = traits.Str(desc="anat, func, dwi or empty for subject/session level")
    meta_dict = traits.Dict(desc="JSON sidecar content")


class DerivativesSink(SimpleInterface):
    """Copy a result to its BIDS-Derivatives name (atomically), with an optional JSON sidecar."""

    input_spec = _DerivativesSinkInputSpec
    output_spec = _FileOutputSpec
    # Rerun even when cached, so outputs deleted since the last run come back from the
    # work directory; an unchanged output is left untouched (same bytes, same inode).
    always_run = True

    def _run_interface(self, runtime):
        spec = self.inputs
        datatype = spec.datatype if isdefined(spec.datatype) and spec.datatype else None
        relative = derivatives.build_path(spec.entities, spec.suffix, spec.extension, datatype)
        out = Path(spec.base_directory) / relative
        if not (out.is_file() and filecmp.cmp(spec.in_file, out, shallow=False)):
            derivatives.write_with(out, lambda tmp: shutil.copyfile(spec.in_file, tmp))
        if isdefined(spec.meta_dict) and spec.meta_dict:
            sidecar = out.with_name(out.name.removesuffix(spec.extension) + ".json")
            if not (sidecar.is_file()
                    and sidecar.read_text() == derivatives.json_text(spec.meta_dict)):
                derivatives.write_json(sidecar, spec.meta_dict)
        self._results["out_file"] = str(out)
        return runtime
