"""Download the official archives of a source, with a progress bar and checksum checks.

Files go to ``<out>/<file>`` through a ``.part`` file renamed only after the checksum (SHA-256
or MD5) matched; a file already present with a matching checksum is not fetched again. Where
no checksum is published, the SHA-256 of what was fetched is printed and appended to
``<out>/SHA256SUMS`` so that later downloads can be compared. Sources behind a login (Kaggle)
print what to fetch by hand.
"""

from __future__ import annotations

import hashlib
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

BBBC = "https://data.broadinstitute.org/bbbc"
LIVECELL = "http://livecell-dataset.s3.eu-central-1.amazonaws.com/LIVECell_dataset_2021"


@dataclass(frozen=True)
class RemoteFile:
    url: str
    name: str
    sha256: str | None = None
    md5: str | None = None


FILES: dict[str, list[RemoteFile]] = {
    "bbbc038": [RemoteFile(f"{BBBC}/BBBC038/{n}", n) for n in (
        "stage1_train.zip", "stage1_test.zip", "stage1_solution.csv", "stage2_test_final.zip",
        "stage2_solution_final.csv", "stage1_train_labels.csv")],
    "bbbc039": [RemoteFile(f"{BBBC}/BBBC039/{n}", n) for n in ("images.zip", "masks.zip", "metadata.zip")],
    "bbbc007": [RemoteFile(f"{BBBC}/BBBC007/{n}", n) for n in ("BBBC007_v1_images.zip", "BBBC007_v1_outlines.zip")],
    "bbbc009": [RemoteFile(f"{BBBC}/BBBC009/{n}", n) for n in ("BBBC009_v1_images.zip", "BBBC009_v1_outlines.zip")],
    "bbbc018": [RemoteFile(f"{BBBC}/BBBC018/{n}", n) for n in ("BBBC018_v1_images.zip", "BBBC018_v1_outlines.zip")],
    "bbbc041": [RemoteFile(f"{BBBC}/BBBC041/malaria.zip", "malaria.zip")],
    "livecell": [RemoteFile(f"{LIVECELL}/images.zip", "images.zip")] + [
        RemoteFile(f"{LIVECELL}/annotations/LIVECell/livecell_coco_{s}.json", f"annotations/LIVECell/livecell_coco_{s}.json")
        for s in ("train", "val", "test")],
    "membrane": [RemoteFile("https://github.com/zhixuhao/unet/archive/refs/heads/master.zip", "unet-master.zip")],
}
MANUAL = {
    "sartorius": "Kaggle login required: accept the rules at https://www.kaggle.com/c/sartorius-cell-instance-segmentation "
                 "and run `kaggle competitions download -c sartorius-cell-instance-segmentation`, then unzip.",
    "cho": "BBBC030 archive names are not pinned; fetch the images and ground truth from "
           "https://bbbc.broadinstitute.org/BBBC030 into images/ and ground_truth/.",
    "folder": "A local folder: nothing to download.",
    "monuseg": "Fetch MoNuSegTrainingData.zip (and MoNuSegTestData.zip) from the links on "
               "https://monuseg.grand-challenge.org/Data/ (hosted on Google Drive; CC BY-NC-SA 4.0).",
    "sbsst265": "Fetch the dataset archive from the Files tab of https://www.ebi.ac.uk/biostudies/studies/S-BSST265 "
                "(CC0).",
}


class DownloadError(RuntimeError):
    """A download failed or its checksum did not match; the message names the file and URL."""


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verify(path: Path, item: RemoteFile) -> str:
    """Checksum check; returns the SHA-256. Raises DownloadError on a mismatch."""
    sha = file_digest(path, "sha256")
    if item.sha256 and sha != item.sha256.lower():
        raise DownloadError(f"{item.name}: SHA-256 {sha} differs from the expected {item.sha256} ({item.url})")
    if item.md5 and file_digest(path, "md5") != item.md5.lower():
        raise DownloadError(f"{item.name}: MD5 differs from the expected {item.md5} ({item.url})")
    return sha


def fetch(url: str, dest: Path, desc: str = "") -> None:
    """Stream ``url`` to ``dest`` with a progress bar (urllib: http(s), ftp and file URLs)."""
    from tqdm import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": "cellrcnn-download"})
    with urllib.request.urlopen(request, timeout=60) as resp, open(dest, "wb") as fh:
        total = int(resp.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=desc or dest.name, file=sys.stderr) as bar:
            for block in iter(lambda: resp.read(1 << 20), b""):
                fh.write(block)
                bar.update(len(block))


def download(source: str, out: str | Path, files: list[RemoteFile] | None = None) -> list[Path]:
    """Fetch every official file of ``source`` into ``out``; returns the paths."""
    out = Path(out)
    if files is None:
        if source in MANUAL:
            raise DownloadError(f"{source}: {MANUAL[source]}")
        if source not in FILES:
            raise DownloadError(f"{source}: unknown source; known: {', '.join(sorted(FILES))}")
        files = FILES[source]
    paths = []
    for item in files:
        dest = out / item.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_file() and (item.sha256 or item.md5):
            try:
                _verify(dest, item)
                print(f"{dest}: present, checksum OK")
                paths.append(dest)
                continue
            except DownloadError:
                print(f"{dest}: present but the checksum differs; downloading again")
        elif dest.is_file():
            print(f"{dest}: present (no published checksum; delete it to fetch again)")
            paths.append(dest)
            continue
        part = dest.with_name(dest.name + ".part")
        try:
            fetch(item.url, part, desc=item.name)
        except OSError as exc:
            part.unlink(missing_ok=True)
            raise DownloadError(f"{item.name}: cannot download {item.url} ({exc})") from exc
        try:
            sha = _verify(part, item)
        except DownloadError:
            part.unlink(missing_ok=True)
            raise
        part.replace(dest)
        if not (item.sha256 or item.md5):
            print(f"{dest}: sha256 {sha} (no published checksum; recorded in SHA256SUMS)")
            with open(out / "SHA256SUMS", "a") as fh:
                fh.write(f"{sha}  {item.name}\n")
        paths.append(dest)
    return paths
