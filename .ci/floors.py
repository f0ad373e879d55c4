"""Print pyproject's dependency floors (and the dev extra's) as `name==X` pins: the minimum-version CI job."""

import re
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
pins = []
for dep in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)", dep)
    if match is None:
        raise SystemExit(f"pyproject dependency {dep!r} is not of the form name>=X")
    pins.append(f"{match[1]}=={match[2]}")
print(" ".join(pins))
