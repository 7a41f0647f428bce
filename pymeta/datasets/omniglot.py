"""Omniglot (Lake et al. 2015) from its zips or an unpacked folder, as class-indexed tensors."""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path

import torch

SPLITS = ("train", "val", "test")


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
    """(alphabet, character, drawing name, bytes loader) for every PNG, zips and folders alike;
    a character seen in an earlier source is skipped (the two minimal splits share Greek and
    Latin)."""
    sources = sorted(root.glob("*.zip")) + sorted(
        p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    seen_in: dict[tuple[str, str], str] = {}
    out = []
    for source in sources:
        if source.suffix == ".zip":
            with zipfile.ZipFile(source) as z:
                names = [n for n in z.namelist() if n.lower().endswith(".png")]
            entries = [(tuple(n.split("/")[-3:]), source, n) for n in names]
        else:
            entries = [
                (tuple(p.relative_to(source).parts[-3:]), source, p) for p in source.rglob("*.png")
            ]
        for (alphabet, character, drawing), src, member in sorted(entries, key=lambda e: e[0]):
            key = (alphabet, character)
            if seen_in.setdefault(key, str(src)) != str(src):
                continue
            out.append((alphabet, character, drawing, src, member))
    return out


class Omniglot:
    """Omniglot characters as tensors, with character-disjoint meta-train/val/test splits.

    The first load decodes every PNG (see ``load_image``) and caches one tensor file; later
    loads read the cache.

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
        cache = self._cache_path(root, files, image_size, cache_dir)
        if cache.exists():
            blob = torch.load(cache)
            self.images, self.names = blob["images"], blob["names"]
        else:
            self.images, self.names = self._decode(files, image_size)
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            torch.save({"images": self.images, "names": self.names}, tmp)
            os.replace(tmp, cache)
        order = torch.randperm(len(self.names), generator=torch.Generator().manual_seed(seed))
        n_train = round(split_fractions[0] * len(order))
        n_val = round(split_fractions[1] * len(order))
        self._split_index = {
            "train": order[:n_train].sort().values,
            "val": order[n_train : n_train + n_val].sort().values,
            "test": order[n_train + n_val :].sort().values,
        }

    @staticmethod
    def _cache_path(root: Path, files, image_size: int, cache_dir) -> Path:
        digest = hashlib.sha1()
        for alphabet, character, drawing, src, _ in files:
            digest.update(f"{Path(src).name}/{alphabet}/{character}/{drawing}\n".encode())
        folder = Path(
            cache_dir or os.environ.get("PYMETA_CACHE") or Path.home() / ".cache" / "pymeta"
        )
        return folder / f"omniglot-{image_size}-{digest.hexdigest()[:16]}.pt"

    @staticmethod
    def _decode(files, image_size: int):
        by_char: dict[str, list[torch.Tensor]] = {}
        zips: dict[str, zipfile.ZipFile] = {}
        try:
            for alphabet, character, _, src, member in files:
                if str(src).endswith(".zip"):
                    z = zips.setdefault(str(src), zipfile.ZipFile(src))
                    img = load_image(z.read(member), image_size)
                else:
                    img = load_image(member, image_size)
                by_char.setdefault(f"{alphabet}/{character}", []).append(img)
        finally:
            for z in zips.values():
                z.close()
        drawings = min(len(v) for v in by_char.values())
        names = sorted(by_char)
        images = torch.stack([torch.stack(by_char[n][:drawings]) for n in names])
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
