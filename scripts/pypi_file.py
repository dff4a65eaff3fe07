#!/usr/bin/env python3
"""Download one file of a PyPI project straight from PyPI's simple index, its sha256 checked against
the index's: `python3 scripts/pypi_file.py PROJECT FILENAME DEST` (standard library only).

(`pip download --no-binary :all:` would also build an sdist's build dependencies from source.)
"""
import hashlib
import json
import os
import sys
import urllib.request


def fetch(project, filename, dest):
    req = urllib.request.Request(f"https://pypi.org/simple/{project}/",
                                 headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    files = {f["filename"]: f for f in json.load(urllib.request.urlopen(req))["files"]}
    if filename not in files:
        sys.exit(f"{filename} is not on PyPI")
    data = urllib.request.urlopen(files[filename]["url"]).read()
    if hashlib.sha256(data).hexdigest() != files[filename]["hashes"]["sha256"]:
        sys.exit(f"{filename}: sha256 does not match PyPI's")
    tmp = dest + ".part"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, dest)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    fetch(*sys.argv[1:])
