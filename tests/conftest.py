import io
import zipfile

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def png_bytes(seed: int, size: int = 105) -> bytes:
    """A black-on-white 'character': a seeded block of black pixels."""
    g = torch.Generator().manual_seed(seed)
    from PIL import Image

    img = torch.full((size, size), 255, dtype=torch.uint8)
    r, c = torch.randint(0, size - 30, (2,), generator=g).tolist()
    img[r : r + 30, c : c + 10] = 0
    buf = io.BytesIO()
    Image.fromarray(img.numpy(), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def make_zip(path, split, alphabets, drawers=4, seed=0):
    with zipfile.ZipFile(path, "w") as z:
        for a, (alphabet, n_chars) in enumerate(alphabets):
            for c in range(n_chars):
                for d in range(drawers):
                    name = f"{split}/{alphabet}/character{c + 1:02d}/{a:02d}{c:02d}_{d + 1:02d}.png"
                    z.writestr(name, png_bytes(seed + 1000 * a + 10 * c + d))


@pytest.fixture
def tiny_root(tmp_path):
    root = tmp_path / "omniglot"
    root.mkdir()
    make_zip(
        root / "images_background_small1.zip",
        "images_background_small1",
        [("Greek", 3), ("Runic", 4)],
    )
    # The second zip repeats Greek (as the real minimal splits do): it must be deduplicated.
    make_zip(
        root / "images_background_small2.zip",
        "images_background_small2",
        [("Greek", 3), ("Tifinagh", 3)],
        seed=7,
    )
    return root
