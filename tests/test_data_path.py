"""The file data path: JPEGs decoded by torchvision and cropped as tensors give the boxes, flips and labels of the
former all-PIL path and, up to the resamplers' known difference at box edges, its pixels; PNGs and JPEGs torchvision
rejects fall back to PIL; a broken file is named in a UserError."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec, not a dependency here: the path is kept while
# they exist (tests fail loudly once they are removed)
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
SIZES = [64, 24]  # from boxes of 20-100 % of a 120x90 image: 64 px is mostly upscaled, 24 px downscaled 2-5x


def smooth_image(seed, mode="RGB"):
    """120x90 low-frequency colours (like a photo at this scale): neighbouring pixels differ by ~10 levels at most."""
    coarse = torch.rand(1, 3, 4, 5, generator=torch.Generator().manual_seed(seed)) * 255
    x = F.interpolate(coarse, size=(90, 120), mode="bicubic", align_corners=True).clamp(0, 255).round()
    return Image.fromarray(x[0].permute(1, 2, 0).to(torch.uint8).numpy()).convert(mode)


@pytest.fixture
def files(tmp_path):
    paths = []
    for i in range(6):
        paths.append(str(tmp_path / f"{i}.jpg"))
        smooth_image(i).save(paths[-1], quality=95)
    return paths


def datasets(files):
    src = common.Source(list(range(len(files))), files=files)
    views = common.Views(common.two_views((0.2, 1.0)), SIZES, [common.mocov2_recipe(False)] * 2)
    return [common.ViewDataset(src, views, seed=3, pil=pil) for pil in (False, True)]


def as_tensor(im):
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)


def diff(a, b):
    return (a.int() - b.int()).abs()


def edge_bound(image, box, size):
    """Largest difference the two resamplers may show on an output pixel. Both are the same separable triangle
    filter in fixed point (1 level of rounding), but PIL's window reaches past the box edge where the tensor path
    cuts the box first (as torchvision's RandomResizedCrop on tensors). On an image whose neighbouring pixels differ
    by at most `step`, that moves an edge pixel, per axis, by at most: upscaling, half the weight onto the pixel
    just outside (step / 2); downscaling by f, 1/8 of the weight onto pixels ~f px away (taken as f / 4 * step)."""
    step = max(diff(image[:, 1:], image[:, :-1]).max(), diff(image[:, :, 1:], image[:, :, :-1]).max()).item()
    _, _, h, w = box
    return 1 + math.ceil(step * sum(max(0.5, side / size / 4) for side in (h, w)))


def test_tensor_path_matches_pil_path(files):
    new, old = datasets(files)
    for epoch in range(2):
        for ds in (new, old):
            ds.epoch.fill_(epoch)
        for i in range(len(files)):
            a, b = new[i], old[i]
            for key in ("index", "label", "src", "boxes", "flips", "photo"):
                assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key
            image = as_tensor(Image.open(files[i]).convert("RGB"))
            for k, size in enumerate(SIZES):
                va, vb = a[f"view{k}"], b[f"view{k}"]
                assert va.dtype == torch.uint8 and va.shape == vb.shape == (3, size, size)
                d = diff(va, vb)
                assert d.float().mean() < 0.5  # differences sit on the edge rows and columns only
                assert d[:, 2:-2, 2:-2].max() <= 1  # PIL's window stays inside the box: only fixed-point rounding
                assert d.max() <= edge_bound(image, a["boxes"][k].int().tolist(), size)


def test_tensor_path_is_pils_crop_then_resize(files):
    """What the tensor path computes, exactly: PIL cutting the box first, then resizing (1 level of rounding)."""
    new, _ = datasets(files)
    for i in range(len(files)):
        item, image = new[i], Image.open(files[i]).convert("RGB")
        for k, size in enumerate(SIZES):
            t, l, h, w = item["boxes"][k].int().tolist()
            ref = image.crop((l, t, l + w, t + h)).resize((size, size), Image.BILINEAR)
            ref = as_tensor(ref.transpose(Image.FLIP_LEFT_RIGHT) if item["flips"][k] else ref)
            assert diff(item[f"view{k}"], ref).max() <= 1


def test_grayscale_jpeg_gives_three_equal_channels(tmp_path):
    path = str(tmp_path / "gray.jpg")
    smooth_image(0, "L").save(path, quality=95)
    new, old = datasets([path])
    a, b = new[0], old[0]
    for k in range(2):
        v = a[f"view{k}"]
        assert v.shape[0] == 3 and torch.equal(v[0], v[1]) and torch.equal(v[1], v[2])
        assert diff(v, b[f"view{k}"]).float().mean() < 0.5


def test_png_falls_back_to_pil_even_when_named_jpeg(tmp_path):
    image = smooth_image(1)
    paths = [str(tmp_path / "a.png"), str(tmp_path / "b.JPEG")]  # ImageNet holds a PNG named .JPEG
    for p in paths:
        image.save(p, format="PNG")
    for p in paths:
        assert torch.equal(common._read_rgb(p), as_tensor(image))
    new, old = datasets(paths)
    for i in range(2):
        for k in range(2):
            assert diff(new[i][f"view{k}"], old[i][f"view{k}"]).float().mean() < 0.5


def test_truncated_jpeg_is_named(files, tmp_path):
    data = open(files[0], "rb").read()
    broken = str(tmp_path / "broken.jpg")
    open(broken, "wb").write(data[:len(data) // 2])
    new, _ = datasets([files[1], broken])
    new[0]
    with pytest.raises(common.UserError, match="broken.jpg"):
        new[1]


def test_views_do_not_depend_on_workers(files):
    """Spawned workers (as under --gpus N) get the same views as the main process: the dataset pickles and every
    draw comes from (seed, epoch, index)."""
    new, _ = datasets(files)
    new.epoch.fill_(1)
    kw = dict(batch_size=3, shuffle=False)
    main = list(torch.utils.data.DataLoader(new, **kw))
    spawned = list(torch.utils.data.DataLoader(new, num_workers=1, multiprocessing_context="spawn", **kw))
    for a, b in zip(main, spawned, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
