"""Text-to-image search over a folder of images, with an on-disk embedding index.

The folder is embedded once; the index (``.npz``: embeddings + a manifest of each file's
relative path, size, modification and change times and inode + the export's id) is reused
while nothing changed and updated incrementally when files are added, changed or removed, or
rebuilt for another export. Images that cannot be read are skipped and reported, never silently
embedded; the index remembers them, so they are not read again until they change.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..errors import ConfigError, OutputPathError
from ..io import require_dir
from .runtime import OrtEncoder, clean_query

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"}


@dataclass
class Hit:
    rank: int
    score: float
    path: Path


def cache_dir() -> Path:
    """$HARMA_FAST_CACHE, or ~/.cache/harma_fast when it is unset or empty (an empty value made the
    index a relative path: ./gallery/ appeared in whatever folder search ran in)."""
    return Path(os.environ.get("HARMA_FAST_CACHE") or Path.home() / ".cache" / "harma_fast")


def default_index_path(folder: Path, encoder: OrtEncoder, root: Optional[Path] = None) -> Path:
    """``<root>/<key>.npz``, one index per image folder and export (root: the user's cache)."""
    if root is None:
        root = cache_dir() / "gallery"
    # surrogateescape: a folder name that is not UTF-8 (its bytes come back as lone surrogates)
    key = hashlib.sha1(f"{folder.resolve()}|{encoder.meta['export_id']}".encode("utf-8", "surrogateescape"))
    key = key.hexdigest()[:20]
    return root / f"{key}.npz"


def resolve_index_path(index: Optional[os.PathLike], folder: Path, encoder: OrtEncoder) -> Path:
    """Where the index of ``folder`` lives: ``index`` itself if it names a file, a file inside it if it
    is a folder (an existing one, or a new path ending in a separator or without a suffix), the
    cache otherwise. Checked writable here, before anything is embedded."""
    from ..io import check_output_file

    if index is None:  # the cache: checked too, naming the variable that sets it
        try:
            return check_output_file(default_index_path(folder, encoder), "the search index")
        except OutputPathError as err:
            where = f"HARMA_FAST_CACHE is {os.environ['HARMA_FAST_CACHE']}" if os.environ.get("HARMA_FAST_CACHE") \
                else f"the default cache {cache_dir()}"
            raise OutputPathError(f"{err} ({where}; set HARMA_FAST_CACHE to a folder you may write, or give "
                                  "--index)") from None
    path = Path(index)
    if path.is_dir() or (not path.exists() and (str(index).endswith(("/", os.sep)) or not path.suffix)):
        path = default_index_path(folder, encoder, path)
    elif path.suffix.lower() != ".npz":  # refused before it is written too: a file search then refused to read back
        raise OutputPathError(f"--index {path} is not a .npz file name; give a .npz file or a folder")
    elif path.is_file() and not _is_index(path):
        raise OutputPathError(f"--index {path} is a .npz file but not a harma_fast search index (it would be "
                              "overwritten); give another file name or a folder")
    return check_output_file(path, "--index")


def _is_index(path: Path) -> bool:
    """Whether ``path`` holds what GalleryIndex writes (a damaged index counts: it is ours to rebuild)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return {"embeddings.npy", "meta.npy"} <= set(archive.namelist())
    except (zipfile.BadZipFile, EOFError):
        try:
            with open(path, "rb") as f:
                head = f.read(2)
        except OSError:
            return False
        return head in (b"", b"PK")  # an empty file or a cut-off zip: our index, damaged; else someone's file
    except OSError:
        return False


def check_query(query: str) -> str:
    """The query, refused if blank once cleaned as ``encode_texts`` cleans it (punctuation alone is
    removed to nothing): it would rank the gallery by an empty caption."""
    if not isinstance(query, str):
        what = "not a string"
    elif not query.strip():
        what = "empty"
    elif not clean_query(query).strip():
        what = "empty once cleaned (punctuation is removed, as training removed it from captions)"
    else:
        return query
    raise ConfigError(f"the query {query!r} is {what}; give a caption to search for, e.g. \"a river crossing "
                      "farmland\"")


def truncation_warning(encoder: OrtEncoder, query: str) -> Optional[str]:
    """A sentence saying how much of ``query`` the text encoder cannot read, or None if it all fits."""
    tokenizer = encoder.tokenizer
    if tokenizer is None:
        return None
    length, room = tokenizer.fit(clean_query(query))  # what encode_texts tokenizes
    if length <= room:
        return None
    return (f"the query is {length} tokens long but the text encoder reads {room}; it was truncated, the "
            f"last {length - room} tokens are ignored (shorten the query to keep them)")


def scan(folder: Path) -> Dict[str, Tuple[int, ...]]:
    """{relative path: (size, mtime_ns, inode, ctime_ns)} of every image file below ``folder``.
    Size and mtime alone miss a file replaced by one of the same size with its mtime kept (cp -p,
    rsync -a, tar): the replacement has another inode, or a new change time (utime sets it)."""
    require_dir(folder, "image folder")
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            st = path.stat()
            found[path.relative_to(folder).as_posix()] = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    return found


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, progress: bool):
    """tqdm's bar over ``total`` images where one is wanted, else (or without tqdm) one that draws
    nothing: serving needs only numpy, onnxruntime, pillow, regex and ftfy (README), and search
    failed with an internal error in such an install, for the bar alone."""
    from ..progress import bar_wanted

    if not total or not bar_wanted(progress):
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc="embedding images", unit="img", leave=False)


class GalleryIndex:
    def __init__(self, folder, encoder: OrtEncoder, index_path: Optional[os.PathLike] = None, progress: bool = False):
        self.folder, self.encoder = Path(folder), encoder
        self.path = resolve_index_path(index_path, self.folder, encoder)
        self.progress = progress
        self.names: List[str] = []
        self.embeddings = np.zeros((0, encoder.embed_dim), np.float32)
        self.skipped: Dict[str, str] = {}
        self.status = ""
        self._sync()

    def _load(self):
        """({name: (stats, embedding)}, {name: (stats, why unreadable)}, why the index is unusable or None).
        Stats of an older index (size and mtime only) never equal scan()'s: its images are embedded again."""
        if not self.path.is_file():
            return {}, {}, None
        try:
            with np.load(self.path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                if not isinstance(meta, dict):
                    raise ValueError("its manifest is not an object")
                if meta.get("export_id") != self.encoder.meta["export_id"]:
                    return {}, {}, "the index was built with another export"
                emb = data["embeddings"]
            cached = {n: (tuple(m), emb[i]) for i, (n, m) in enumerate(zip(meta["names"], meta["stats"], strict=True))}
            unreadable = {n: (tuple(m), str(why)) for n, m, why in meta.get("unreadable", [])}
            return cached, unreadable, None
        except (OSError, ValueError, KeyError, IndexError, TypeError, EOFError,
                zipfile.BadZipFile) as err:  # truncated, corrupt, or a lone array (np.load gives no archive)
            return {}, {}, f"the index file was unreadable ({type(err).__name__}: {err})"

    def _sync(self) -> None:
        current = scan(self.folder)
        if not current:
            raise ConfigError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {self.folder}")
        existed = self.path.is_file()
        cached, unreadable, why = self._load()
        keep = {n: cached[n][1] for n, st in current.items() if n in cached and cached[n][0] == st}
        # unreadable images are not read again until they change (they were retried, and the index
        # rewritten, on every search)
        self.skipped = {n: unreadable[n][1] for n, st in current.items() if n in unreadable and unreadable[n][0] == st}
        todo = [n for n in current if n not in keep and n not in self.skipped]
        removed = [n for n in {**cached, **unreadable} if n not in current]
        bar = _progress_bar(len(todo), self.progress)
        embedded = 0
        try:
            for start in range(0, len(todo), 64):
                chunk = todo[start:start + 64]
                pixels, ok = [], []
                for name in chunk:
                    try:
                        pixels.append(self.encoder.preprocess(self.folder / name))
                        ok.append(name)
                    except (ValueError, FileNotFoundError) as err:
                        self.skipped[name] = str(err)
                if ok:
                    for name, vec in zip(ok, self.encoder.encode_pixels(np.stack(pixels)), strict=True):
                        keep[name] = vec
                    embedded += len(ok)
                bar.update(len(chunk))
        except KeyboardInterrupt:
            # what was embedded is saved, so the next search embeds only the rest: an interrupted
            # indexing of a large folder (hours on a CPU) started again from nothing
            if embedded:
                self._collect(current, keep)
                self._save(current)
            raise
        finally:
            bar.close()
        self._collect(current, keep)
        if todo or removed or why:
            failed = len(todo) - embedded
            # a first search "built" its index: "rebuilt" there made users look for an earlier index gone bad
            verb = "built" if not existed else "rebuilt" if why or not cached else "updated"
            self.status = (f"index {verb}: {embedded} embedded, "
                           + (f"{failed} unreadable, " if failed else "")
                           + f"{len(removed)} removed, {len(self.names)} in all" + (f" ({why})" if why else ""))
            self._save(current)
        else:
            self.status = f"index reused: {len(self.names)} images unchanged" + (
                f", {len(self.skipped)} unreadable (not read again until they change)" if self.skipped else "")

    def _collect(self, current, keep) -> None:
        self.names = [n for n in current if n in keep]
        self.embeddings = np.stack([keep[n] for n in self.names]).astype(np.float32) if self.names else self.embeddings

    def _save(self, current) -> None:
        from ..io import atomic_path

        meta = {"export_id": self.encoder.meta["export_id"], "folder": str(self.folder.resolve()),
                "names": self.names, "stats": [list(current[n]) for n in self.names],
                "unreadable": [[n, list(current[n]), why] for n, why in self.skipped.items()]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, embeddings=self.embeddings, meta=np.array(json.dumps(meta)))

    def search(self, query: str, top_k: int = 10) -> List[Hit]:
        """The ``top_k`` images most similar to ``query``; ``Hit.score`` is their cosine similarity."""
        check_query(query)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"top_k (--top-k) must be an integer >= 1, got {top_k!r}")
        if not self.names:
            raise ConfigError(f"no readable images in {self.folder} (every image was skipped)")
        q = self.encoder.encode_texts([query])[0]
        scores = self.embeddings @ q
        order = np.argsort(-scores, kind="stable")[:top_k]
        return [Hit(r + 1, float(scores[i]), self.folder / self.names[i]) for r, i in enumerate(order)]


def _thumbnail(path: Path, size: int = 256) -> str:
    from ..io import open_rgb

    img = open_rgb(path)  # as it was embedded
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def shown(text) -> str:
    """``text`` (a path) encodable as UTF-8 on any stream: a file name that is not UTF-8 (its
    bytes decoded as lone surrogates) is shown with those bytes as \\xff escapes (the search
    page and a strict UTF-8 stdout raised UnicodeEncodeError on it)."""
    text = str(text)
    try:
        raw = text.encode("utf-8", "surrogateescape")  # the name's own bytes
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def _html_text(text) -> str:
    return html.escape(shown(text))


# how every page write_html writes begins: what is_search_page recognises
_PAGE_START = '<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>harma-fast search:'


def is_search_page(path: Path) -> bool:
    """Whether ``path`` is a page :func:`write_html` wrote (what ``search --html`` may replace)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(_PAGE_START.encode())).decode("utf-8", "replace") == _PAGE_START
    except OSError:
        return False


def write_html(path, query: str, hits: List[Hit]) -> None:
    """A self-contained page: the query and the retrieved images (embedded thumbnails) with scores."""
    from ..io import atomic_path

    cards = "\n".join(
        f'<figure><img src="{_thumbnail(h.path)}" alt="{_html_text(h.path.name)}"><figcaption>#{h.rank} · '
        f'cosine {h.score:.3f}<br><small>{_html_text(h.path)}</small></figcaption></figure>' for h in hits)
    page = _PAGE_START + f""" {_html_text(query)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2rem;background:#fafafa}}
.grid{{display:flex;flex-wrap:wrap;gap:1rem}}figure{{margin:0;background:#fff;padding:.5rem;border-radius:6px;
box-shadow:0 1px 3px #0002;width:256px}}img{{width:256px;height:256px;object-fit:cover}}
figcaption{{font-size:.9rem;word-break:break-all}}</style></head>
<body><h1>“{_html_text(query)}”</h1>
<p>top {len(hits)} images, by cosine similarity of image and query embeddings</p><div class="grid">
{cards}
</div></body></html>
"""
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
