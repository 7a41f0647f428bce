"""Omniglot (Lake et al. 2015) from its zips or an unpacked folder, as class-indexed tensors."""

from __future__ import annotations

import collections
import hashlib
import io
import os
import zipfile
from pathlib import Path

import torch

from pymeta.safe_files import CheckpointError, load_file, save_file

SPLITS = ("train", "val", "test")
CACHE_FORMAT = "pymeta-omniglot-cache"


def load_image(path_or_file, image_size: int = 28) -> torch.Tensor:
    """Loads one character image with exactly the Omniglot loader's preprocessing.

    Grayscale, resized to ``image_size`` x ``image_size`` (Lanczos), strokes 1.0 and background
    0.0 (Omniglot PNGs are black strokes on white).

    Args:
        path_or_file: a path, or a binary file object / bytes of an image.
        image_size: output height and width.

    Returns:
        A float32 tensor (1, image_size, image_size) in [0, 1].
    """
    from PIL import Image

    if isinstance(path_or_file, (bytes, bytearray)):
        path_or_file = io.BytesIO(path_or_file)
    try:
        with Image.open(path_or_file) as img:
            gray = img.convert("L").resize((image_size, image_size), Image.LANCZOS)
            data = torch.frombuffer(bytearray(gray.tobytes()), dtype=torch.uint8)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"path_or_file: expected a readable image, received {path_or_file!r} ({err})"
        ) from err
    return (1.0 - data.float().div(255.0)).view(1, image_size, image_size)


def _character_files(root: Path):
    """(alphabet, character, drawing name, source, member, fingerprint) for every PNG, zips and
    folders alike; a character seen in an earlier source is skipped (the two minimal splits
    share Greek and Latin). The fingerprint identifies the content: a zip member's CRC-32 and
    size, a file's size and modification time."""
    sources = sorted(root.glob("*.zip")) + sorted(
        p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    seen_in: dict[tuple[str, str], str] = {}
    out = []
    for source in sources:
        if source.suffix == ".zip":
            try:
                with zipfile.ZipFile(source) as z:
                    infos = [i for i in z.infolist() if i.filename.lower().endswith(".png")]
            except (zipfile.BadZipFile, OSError) as err:
                raise ValueError(
                    f"root: expected readable zips, received {str(source)!r} ({err})"
                ) from None
            entries = [
                (tuple(i.filename.split("/")[-3:]), source, i.filename,
                 f"{i.CRC:08x}:{i.file_size}")
                for i in infos
            ]  # fmt: skip
        else:
            entries = []
            for p in source.rglob("*.png"):
                stat = p.stat()
                entries.append(
                    (tuple(p.relative_to(source).parts[-3:]), source, p,
                     f"{stat.st_size}:{stat.st_mtime_ns}")
                )  # fmt: skip
        for (alphabet, character, drawing), src, member, print_ in sorted(
            entries, key=lambda e: e[0]
        ):
            key = (alphabet, character)
            if seen_in.setdefault(key, str(src)) != str(src):
                continue
            out.append((alphabet, character, drawing, src, member, print_))
    return out


def _check_drawing_counts(files) -> None:
    """Every character must have the same number of drawings (the (C, D, ...) tensor), and
    none is cut to fit: a character with another count is an error that names it."""
    counts = collections.Counter(f"{a}/{c}" for a, c, *_ in files)
    usual, _ = collections.Counter(counts.values()).most_common(1)[0]
    odd = {name: n for name, n in counts.items() if n != usual}
    if odd:
        sources = {f"{a}/{c}": Path(src).name for a, c, _, src, *_ in files}
        listed = ", ".join(f"{name!r} ({sources[name]}) has {n}" for name, n in sorted(odd.items()))
        raise ValueError(
            f"root: expected {usual} drawings for every character, like the other "
            f"{len(counts) - len(odd)}, received: {listed}"
        )


class Omniglot:
    """Omniglot characters as tensors, with character-disjoint meta-train/val/test splits.

    The first load decodes every PNG (see ``load_image``) and caches one tensor file, keyed on
    the sources' contents (zip members' CRC-32 and size, loose files' size and modification
    time); later loads read it. The cache is written and read like a checkpoint
    (``pymeta.safe_files.save_file``/``load_file``: plain data only, ``weights_only=True``,
    SHA-256 checked): a corrupted or foreign cache file is an error that names it (delete it
    to rebuild), never code run or wrong images. Every character must have the same number
    of drawings; one that differs is an error naming it, never a silent truncation.

    Args:
        root: a folder holding the Omniglot zips (e.g. images_background_small1.zip) and/or
            unpacked folders of the same ``<alphabet>/<character>/<drawing>.png`` layout.
        image_size: side of the resized images.
        split_fractions: fractions of characters for (train, val, test).
        seed: the seed of the character split (fixed: the splits never change between runs).
        cache_dir: where the tensor cache goes (default: ``$PYMETA_CACHE`` or
            ``~/.cache/pymeta``; the data folder may be read-only).

    Attributes:
        images: (C, D, 1, H, W) uint8, C characters with D drawings each (strokes 255).
        names: the C "alphabet/character" names.
    """

    def __init__(
        self,
        root,
        image_size: int = 28,
        split_fractions=(0.6, 0.2, 0.2),
        seed: int = 0,
        cache_dir=None,
    ):
        root = Path(root)
        if not root.is_dir():
            raise ValueError(
                f"root: expected a folder of Omniglot zips or images, received {str(root)!r}"
            )
        if (
            len(split_fractions) != 3
            or abs(sum(split_fractions) - 1.0) > 1e-6
            or min(split_fractions) <= 0
        ):
            raise ValueError(
                "split_fractions: expected three positive fractions summing to 1, "
                f"received {split_fractions}"
            )
        self.image_size = image_size
        files = _character_files(root)
        if not files:
            raise ValueError(f"root: found no PNG images in {str(root)!r} (zips or folders)")
        _check_drawing_counts(files)
        cache, source = self._cache_path(files, image_size, cache_dir)
        if cache.exists():
            self.images, self.names = self._read_cache(cache, source)
        else:
            self.images, self.names = self._decode(files, image_size)
            blob = {"source": source, "images": self.images, "names": self.names}
            save_file(cache, blob, CACHE_FORMAT)
        order = torch.randperm(len(self.names), generator=torch.Generator().manual_seed(seed))
        n_train = round(split_fractions[0] * len(order))
        n_val = round(split_fractions[1] * len(order))
        self._split_index = {
            "train": order[:n_train].sort().values,
            "val": order[n_train : n_train + n_val].sort().values,
            "test": order[n_train + n_val :].sort().values,
        }

    @staticmethod
    def _cache_path(files, image_size: int, cache_dir) -> tuple[Path, str]:
        """The cache file and the full key of its sources: every file's name and content
        fingerprint, so a changed zip or image never reuses an old cache."""
        digest = hashlib.sha256()
        for alphabet, character, drawing, src, _, print_ in files:
            digest.update(f"{Path(src).name}/{alphabet}/{character}/{drawing}:{print_}\n".encode())
        folder = Path(
            cache_dir or os.environ.get("PYMETA_CACHE") or Path.home() / ".cache" / "pymeta"
        )
        key = digest.hexdigest()
        return folder / f"omniglot-{image_size}-{key[:16]}.pt", key

    @staticmethod
    def _read_cache(cache: Path, source: str):
        try:
            blob = load_file(cache, CACHE_FORMAT, "cache")
        except CheckpointError as err:
            raise CheckpointError(f"{err}; delete it to rebuild the cache") from None
        if blob.get("source") != source:
            raise CheckpointError(
                f"cache: {str(cache)!r} was built from other files (expected source key "
                f"{source[:16]}..., received {str(blob.get('source'))[:16]}...); delete it to "
                "rebuild the cache"
            )
        return blob["images"], blob["names"]

    @staticmethod
    def _decode(files, image_size: int):
        by_char: dict[str, list[torch.Tensor]] = {}
        zips: dict[str, zipfile.ZipFile] = {}
        try:
            for alphabet, character, _, src, member, _ in files:
                try:
                    if str(src).endswith(".zip"):
                        z = zips.setdefault(str(src), zipfile.ZipFile(src))
                        img = load_image(z.read(member), image_size)
                    else:
                        img = load_image(member, image_size)
                except (ValueError, OSError, zipfile.BadZipFile) as err:
                    raise ValueError(
                        f"root: expected readable images, received {member!s} in "
                        f"{str(src)!r} ({err})"
                    ) from None
                by_char.setdefault(f"{alphabet}/{character}", []).append(img)
        finally:
            for z in zips.values():
                z.close()
        names = sorted(by_char)
        images = torch.stack([torch.stack(by_char[n]) for n in names])
        return images.mul(255).round().to(torch.uint8), names

    @property
    def num_characters(self) -> int:
        return len(self.names)

    def split(self, name: str, rotations: bool = False) -> torch.Tensor:
        """The images of one split as float tensors (C, D, 1, H, W) in [0, 1].

        Args:
            name: "train", "val" or "test" (character-disjoint).
            rotations: add the 90/180/270-degree rotations of every character as new classes
                (the MAML paper's augmentation; use it for training only).
        """
        if name not in SPLITS:
            raise ValueError(f"name: expected one of {SPLITS}, received {name!r}")
        images = self.images[self._split_index[name]].float().div(255.0)
        if rotations:
            images = torch.cat([torch.rot90(images, k, dims=(-2, -1)) for k in range(4)])
        return images

    def split_names(self, name: str) -> list[str]:
        """The "alphabet/character" names of one split's classes (without rotations)."""
        if name not in SPLITS:
            raise ValueError(f"name: expected one of {SPLITS}, received {name!r}")
        return [self.names[i] for i in self._split_index[name].tolist()]
