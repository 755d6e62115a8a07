"""What memedit writes and how it names it: the subspace's format and file names, the folder a
baked (or exported) model carries its provenance in, and memedit's version, which every
artifact records. Everything that writes or reads these names imports them from here."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("memedit")
except PackageNotFoundError:  # running from a source tree without installation
    VERSION = "0+unknown"

# A located subspace: boolean masks (safetensors) plus a JSON manifest.
FORMAT = "memedit-subspace"
FORMAT_VERSION = 1
MASKS_FILE = "masks.safetensors"
MANIFEST_FILE = "subspace.json"
# The spec memedit.load_pipeline(None) reports: the embedded 11 MB test model.
EMBEDDED_SPEC = "memedit-testbed"
# The folder inside a sanitized (or exported) model that holds its subspace and records.
PROVENANCE_DIR = "memedit"
PROVENANCE_FILE = "sanitized.json"
