"""Data layer: sources -> Manifest -> patient-level splits/partitions -> cached torch datasets."""
from common.data.manifest import Box, Exclusion, Manifest, Sample
from common.data.sources import detect_source, load_manifest
from common.data.splits import assert_no_patient_overlap, partition, patient_split

__all__ = ["Box", "Exclusion", "Manifest", "Sample", "detect_source", "load_manifest", "partition",
           "patient_split", "assert_no_patient_overlap"]
