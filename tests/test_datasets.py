"""Omniglot loading (on a tiny data set made in the Omniglot layout), FewShot tasks, conv4."""

import os
import zipfile

import pytest
import torch
from torch.utils.data import DataLoader

import pymeta
from pymeta.datasets import Omniglot, load_image
from pymeta.tasks import FewShot


def test_load_image_preprocessing(tmp_path):
    from conftest import png_bytes

    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(0))
    img = load_image(path, image_size=28)
    assert img.shape == (1, 28, 28) and img.dtype == torch.float32
    assert float(img.min()) >= 0 and float(img.max()) <= 1
    assert float(img.max()) > 0.9  # strokes are 1
    assert float(img[0, 0, 0]) < 0.05 or float(img[0, -1, -1]) < 0.05  # background is 0
    torch.testing.assert_close(load_image(path.read_bytes()), img)
    with pytest.raises(ValueError, match="path_or_file: expected a readable image"):
        load_image(b"not an image")


def test_omniglot_reads_zips_dedupes_and_caches(tiny_root, tmp_path):
    cache = tmp_path / "cache"
    ds = Omniglot(tiny_root, cache_dir=cache)
    assert ds.num_characters == 3 + 4 + 3  # Greek once
    assert ds.images.shape == (10, 4, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert sum(n.startswith("Greek/") for n in ds.names) == 3
    files = list(cache.glob("omniglot-28-*.pt"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    again = Omniglot(tiny_root, cache_dir=cache)
    assert files[0].stat().st_mtime_ns == stamp  # read from the cache, not rewritten
    assert torch.equal(again.images, ds.images)
    # Each image equals load_image of its PNG.
    with zipfile.ZipFile(tiny_root / "images_background_small1.zip") as z:
        first = load_image(z.read("images_background_small1/Greek/character01/0000_01.png"))
    torch.testing.assert_close(
        ds.images[ds.names.index("Greek/character01"), 0].float() / 255, first, atol=1 / 255, rtol=0
    )


def test_unpacked_folder_gives_the_same_data(tiny_root, tmp_path):
    folder = tmp_path / "unpacked"
    for z in tiny_root.glob("*.zip"):
        zipfile.ZipFile(z).extractall(folder)
    a = Omniglot(tiny_root, cache_dir=tmp_path / "c1")
    b = Omniglot(folder, cache_dir=tmp_path / "c2")
    assert a.names == b.names and torch.equal(a.images, b.images)


def test_splits_are_character_disjoint_deterministic_and_rotatable(tiny_root, tmp_path):
    ds = Omniglot(tiny_root, cache_dir=tmp_path, split_fractions=(0.6, 0.2, 0.2))
    names = {s: set(ds.split_names(s)) for s in ("train", "val", "test")}
    assert sum(len(v) for v in names.values()) == ds.num_characters
    assert not (names["train"] & names["val"]) and not (names["train"] & names["test"])
    assert not (names["val"] & names["test"])
    again = Omniglot(tiny_root, cache_dir=tmp_path, split_fractions=(0.6, 0.2, 0.2))
    assert again.split_names("test") == ds.split_names("test")
    train = ds.split("train")
    rotated = ds.split("train", rotations=True)
    assert rotated.shape[0] == 4 * train.shape[0] and rotated.dtype == torch.float32
    torch.testing.assert_close(rotated[train.shape[0]], torch.rot90(train[0], 1, dims=(-2, -1)))


def test_omniglot_bad_input(tmp_path):
    with pytest.raises(ValueError, match="root: expected a folder"):
        Omniglot(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="root: found no PNG images"):
        Omniglot(tmp_path / "empty", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="split_fractions"):
        Omniglot(tmp_path / "empty", split_fractions=(0.5, 0.5))


def test_few_shot_tasks():
    examples = (
        torch.arange(6 * 5, dtype=torch.float32)
        .view(6, 5, 1, 1, 1)
        .expand(6, 5, 1, 2, 2)
        .contiguous()
    )
    tasks = FewShot(examples, n_way=3, k_shot=2, k_query=3)
    batch = tasks.sample(4, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (4, 6, 1, 2, 2) and batch.query_x.shape == (4, 9, 1, 2, 2)
    assert batch.support_y.dtype == torch.long and batch.support_y[0].tolist() == [0, 0, 1, 1, 2, 2]
    for t in range(4):
        cls_of = lambda v: int(v) // 5  # noqa: E731  (example value -> its class)
        support_classes = [cls_of(v) for v in batch.support_x[t, :, 0, 0, 0]]
        query_classes = [cls_of(v) for v in batch.query_x[t, :, 0, 0, 0]]
        # One class per label, the same in support and query, no example used twice.
        for label in range(3):
            s = {c for c, y in zip(support_classes, batch.support_y[t].tolist()) if y == label}
            q = {c for c, y in zip(query_classes, batch.query_y[t].tolist()) if y == label}
            assert len(s) == 1 and s == q
        values = torch.cat([batch.support_x[t, :, 0, 0, 0], batch.query_x[t, :, 0, 0, 0]])
        assert values.unique().numel() == values.numel()
    assert torch.equal(tasks[3][0], tasks[3][0])  # item i is always the same task


def test_few_shot_with_dataloader_workers():
    examples = torch.randn(10, 6, 1, 4, 4)
    tasks = FewShot(examples, n_way=2, k_shot=1, k_query=2, num_tasks=8, seed=3)
    loader = DataLoader(tasks, batch_size=4, num_workers=2, collate_fn=FewShot.collate)
    batches = list(loader)
    assert len(batches) == 2 and isinstance(batches[0], pymeta.TaskBatch)
    assert torch.equal(batches[1].support_x[0], tasks[4][0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_way=11, k_shot=1, k_query=1), r"n_way: expected at most 10"),
        (dict(n_way=2, k_shot=4, k_query=3), r"k_shot \+ k_query: expected at most 6"),
        (dict(n_way=0, k_shot=1, k_query=1), r"n_way: expected a positive int"),
    ],
)
def test_few_shot_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FewShot(torch.randn(10, 6, 1, 4, 4), **kwargs)


def test_conv4_shapes_and_maml_step():
    net = pymeta.models.conv4(n_way=5, hidden=8)
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 5)
    examples = torch.rand(12, 4, 1, 28, 28)
    batch = FewShot(examples, n_way=5, k_shot=1, k_query=2).sample(
        2, torch.Generator().manual_seed(0)
    )
    maml = pymeta.MAML(net, inner_lr=0.4, loss="cross_entropy")
    maml.meta_loss(batch).backward()
    assert all(p.grad is not None for p in net.parameters())
    with pytest.raises(ValueError, match="image_size: expected at least 16"):
        pymeta.models.conv4(5, image_size=8)


def test_a_character_with_fewer_drawings_is_an_error_naming_it(tiny_root, tmp_path):
    # Drop one drawing of Runic/character02: before, every character was cut to 3 drawings.
    path = tiny_root / "images_background_small1.zip"
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            if "/Runic/character02/" not in name or not name.endswith("_04.png"):
                z.writestr(name, data)
    with pytest.raises(
        ValueError,
        match=r"root: expected 4 drawings for every character, like the other 9, received: "
        r"'Runic/character02' \(images_background_small1.zip\) has 3",
    ):
        Omniglot(tiny_root, cache_dir=tmp_path / "cache")


def test_the_cache_is_keyed_on_file_contents_not_names(tiny_root, tmp_path):
    from conftest import make_zip

    cache = tmp_path / "cache"
    old = Omniglot(tiny_root, cache_dir=cache)
    # The same names, other images (another seed), then the same modification time.
    path = tiny_root / "images_background_small2.zip"
    stat = path.stat()
    make_zip(path, "images_background_small2", [("Greek", 3), ("Tifinagh", 3)], seed=99)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    new = Omniglot(tiny_root, cache_dir=cache)
    fresh = Omniglot(tiny_root, cache_dir=tmp_path / "fresh")
    assert new.names == old.names and torch.equal(new.images, fresh.images)
    assert not torch.equal(new.images, old.images)
    assert len(list(cache.glob("*.pt"))) == 2


def test_the_cache_of_a_folder_follows_changed_files(tiny_root, tmp_path):
    from conftest import png_bytes

    folder = tmp_path / "unpacked"
    for z in tiny_root.glob("*.zip"):
        zipfile.ZipFile(z).extractall(folder)
    old = Omniglot(folder, cache_dir=tmp_path / "cache")
    (png,) = folder.glob("images_background_small1/Runic/character01/*_01.png")
    png.write_bytes(png_bytes(12345))
    new = Omniglot(folder, cache_dir=tmp_path / "cache")
    i = new.names.index("Runic/character01")
    assert not torch.equal(new.images[i, 0], old.images[i, 0])
    torch.testing.assert_close(
        new.images[i, 0].float() / 255, load_image(png), atol=1 / 255, rtol=0
    )


def test_a_corrupt_zip_is_an_error_naming_it(tiny_root, tmp_path):
    bad = tiny_root / "images_background_small3.zip"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match=rf"root: expected readable zips, received '{bad}'"):
        Omniglot(tiny_root, cache_dir=tmp_path / "cache")
    bad.unlink()
    # A damaged member (its CRC-32 no longer matches) names the zip and the member.
    path = tiny_root / "images_background_small1.zip"
    member = "images_background_small1/Runic/character01/0100_01.png"
    with zipfile.ZipFile(path) as z:
        offset = z.getinfo(member).header_offset
    data = bytearray(path.read_bytes())
    data[offset + 200] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"root: expected readable images, received {member} in"):
        Omniglot(tiny_root, cache_dir=tmp_path / "cache")
