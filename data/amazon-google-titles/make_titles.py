"""Keep what the lexical regression test needs from the Leipzig Amazon-Google files:
`python make_titles.py SRC_DIR OUT_DIR` writes amazon.csv (id,title,manufacturer),
google.csv (id,title,manufacturer) and truth.csv (idAmazon,idGoogleBase), all UTF-8.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path


def main(src: Path, out: Path) -> None:
    for name, title_col, target in (("Amazon.csv", "title", "amazon.csv"), ("GoogleProducts.csv", "name", "google.csv")):
        with (src / name).open(encoding="latin-1", newline="") as handle, (out / target).open(
            "w", encoding="utf-8", newline=""
        ) as sink:
            writer = csv.writer(sink)
            writer.writerow(["id", "title", "manufacturer"])
            for row in csv.DictReader(handle):
                writer.writerow([row["id"], row[title_col].strip(), (row["manufacturer"] or "").strip()])
    with (src / "Amzon_GoogleProducts_perfectMapping.csv").open(encoding="latin-1", newline="") as handle, (
        out / "truth.csv"
    ).open("w", encoding="utf-8", newline="") as sink:
        writer = csv.writer(sink)
        writer.writerow(["idAmazon", "idGoogleBase"])
        for row in csv.DictReader(handle):
            writer.writerow([row["idAmazon"], row["idGoogleBase"]])


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
