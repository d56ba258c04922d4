"""Whole images: where they live (registry or OCI layout), reading and writing them, progress.

``snapshotter.convert`` builds on this; the submodules are internal, import from here.
"""

from snapshotter.image.locations import SYNTAX, LayoutLocation, Location, RegistryLocation, parse_location
from snapshotter.image.ocilayout import (
    OCI_CONFIG,
    REPRODUCIBLE_CREATED,
    LayoutDigestError,
    LayoutError,
    LayoutImage,
    OciLayout,
    canonical_json,
    descriptor_json,
    image_config,
)
from snapshotter.image.progress import (
    BarProgress,
    LayerResult,
    Phase,
    PlainProgress,
    Progress,
    Summary,
    reporter,
    summary_text,
)
from snapshotter.image.stores import (
    ImageSource,
    ImageTarget,
    LayoutSource,
    LayoutTarget,
    RegistrySource,
    RegistryTarget,
    SourceImage,
    open_source,
    open_target,
)

__all__ = [
    "OCI_CONFIG",
    "REPRODUCIBLE_CREATED",
    "SYNTAX",
    "BarProgress",
    "ImageSource",
    "ImageTarget",
    "LayerResult",
    "LayoutDigestError",
    "LayoutError",
    "LayoutImage",
    "LayoutLocation",
    "LayoutSource",
    "LayoutTarget",
    "Location",
    "OciLayout",
    "Phase",
    "PlainProgress",
    "Progress",
    "RegistryLocation",
    "RegistrySource",
    "RegistryTarget",
    "SourceImage",
    "Summary",
    "canonical_json",
    "descriptor_json",
    "image_config",
    "open_source",
    "open_target",
    "parse_location",
    "reporter",
    "summary_text",
]
