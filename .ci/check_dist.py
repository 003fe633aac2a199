"""
CI: the sdist and the wheel in DIST carry the license, and the wheel's metadata is what a package
index shows: license expression, classifiers, and a description without relative links, which
would be broken there.

Usage: python .ci/check_dist.py DIST
"""

from __future__ import annotations

import re
import sys
import tarfile
import zipfile
from email.parser import HeaderParser
from pathlib import Path

REQUIRED_CLASSIFIERS = {
    "Development Status :: 4 - Beta",
    "Operating System :: OS Independent",
    *(f"Programming Language :: Python :: 3.{minor}" for minor in (10, 11, 12, 13)),
}


def main(dist: Path) -> None:
    (sdist,) = dist.glob("*.tar.gz")
    (wheel,) = dist.glob("*.whl")
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
        assert any(name.endswith("/LICENSE") for name in names), f"no LICENSE in {sdist.name}"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (license_file,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert "Apache License" in archive.read(license_file).decode(), "LICENSE is not Apache"
        (metadata_file,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = HeaderParser().parsestr(archive.read(metadata_file).decode())
    assert metadata["License-Expression"] == "Apache-2.0", metadata["License-Expression"]
    missing = REQUIRED_CLASSIFIERS - set(metadata.get_all("Classifier", []))
    assert not missing, f"classifiers missing: {sorted(missing)}"
    description = metadata.get_payload()
    assert description.startswith("# torchjd-golden"), description[:200]
    relative = re.findall(r"\]\((?!https?://|#)[^)]*\)", description)
    assert not relative, f"relative links in the package index's description: {relative}"
    print(f"CI: {sdist.name} and {wheel.name} carry LICENSE; metadata and description fit an index")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
