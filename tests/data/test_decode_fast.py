"""The fast decoders without DALI (data/decode/): PIL on its thread pool (the serial pixels, bit for
bit, and the same one-line errors) and torchvision's batched JPEG decoder (data/decode/tvjpeg.py)
against the PIL reference within VIEW_BOUND / MEAN_BOUND (CUDA_BOUND_SCALE times these on a GPU;
data/decode/pixels.py). Photos and helpers: tests/data/conftest.py."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from data.decode import (
    CUDA_BOUND_SCALE, MEAN, MEAN_BOUND, STD, VIEW_BOUND, TorchvisionViewDecoder, denormalize, jpeg_frame,
    make_decoder, pil_view, pil_views, resize_view, to_rgb,
)
from data.decoders import DecodeError
from tests.data.conftest import encode_image, mean_abs, photo_sizes, photo_views

SIZE = 224


# -- PIL on its thread pool -------------------------------------------------------------
def test_pil_pool_gives_the_serial_pixels_bit_for_bit_on_its_own_threads(all_photos, monkeypatch):
    import threading

    import data.decode.pil as pil

    datas, boxes, flips = photo_views(list(all_photos.values()), seed=13, views=2)
    serial = pil_views(datas, boxes, flips, normalize=False)
    normalised = pil_views(datas, boxes, flips)
    threads = set()

    def recorded(*args, **kw):
        threads.add(threading.current_thread().name)
        return pil_view(*args, **kw)

    monkeypatch.setattr(pil, "pil_view", recorded)
    pooled = make_decoder("pil", batch_size=len(datas), device="cpu", num_threads=3)
    assert pooled.keywords == {"num_threads": 3}
    assert torch.equal(pooled(datas, boxes, flips), normalised)
    assert torch.equal(pil_views(datas, boxes, flips, normalize=False, num_threads=3), serial)
    assert threads and all(name.startswith("pil-decode-3") for name in threads), threads
    assert pil.decode_pool(3) is pil.decode_pool(3)                                      # long-lived


def test_pil_pool_error_names_the_first_bad_sample_in_batch_order_as_the_serial_path(all_photos):
    jpeg = all_photos["astronaut_500.jpg"]
    datas = [jpeg, jpeg, jpeg[:500], jpeg, jpeg[:800]]               # samples 2 and 4 are truncated
    boxes = np.array([[0, 0, 100, 100]] * 4 + [[450, 0, 100, 100]])
    flips = np.zeros(5, bool)
    messages = []
    for threads in (1, 4):
        with pytest.raises(DecodeError) as caught:
            pil_views(datas, boxes, flips, num_threads=threads)
        messages.append(str(caught.value))
    assert messages[0] == messages[1] and "\n" not in messages[0]
    assert messages[0].startswith("sample 2 of the batch: PIL cannot decode its view with crop box [0, 0, 100, 100]")
    good = pil_views(datas[:2], boxes[:2], flips[:2], num_threads=4)                    # the pool goes on
    assert torch.equal(good, pil_views(datas[:2], boxes[:2], flips[:2]))
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        pil_views(datas[:1], boxes[:1], flips[:1], num_threads=0)


# -- torchvision's JPEG decoder ------------------------------------------------------------
def test_jpeg_frame_reads_the_frame_header_and_only_plain_jpegs_go_to_torchvision(all_photos):
    from data.decode.tvjpeg import torchvision_decodes

    image = Image.fromarray(np.zeros((30, 40, 3), np.uint8))
    progressive = encode_image(image, "JPEG", progressive=True)
    assert jpeg_frame(progressive) == (0xC2, 8, 30, 40, 3) and torchvision_decodes(jpeg_frame(progressive))
    assert jpeg_frame(encode_image(image.convert("L"), "JPEG"))[1:] == (8, 30, 40, 1)
    assert jpeg_frame(all_photos["astronaut_500.jpg"]) == (0xC0, 8, 500, 500, 3)
    cmyk = jpeg_frame(all_photos["coffee_cmyk_500.jpg"])
    assert cmyk[4] == 4 and not torchvision_decodes(cmyk)                # rule 1 through PIL
    assert jpeg_frame(all_photos["coffee.webp"]) is None and jpeg_frame(all_photos["camera_16bit.png"]) is None
    assert jpeg_frame(progressive[:20]) is None and jpeg_frame(b"\xff\xd8\xff\xda\x00\x02") is None


@pytest.mark.usefixtures("one_torch_thread")
def test_resize_view_is_pils_crop_and_two_pass_resize(all_photos):
    # On PNG bytes both start from the same pixels: only the resize is compared.
    data = all_photos["rocket_palette_trns.png"]
    rgb = torch.from_numpy(to_rgb(Image.open(io.BytesIO(data))).copy()).permute(2, 0, 1).contiguous()
    (w,), (h,) = photo_sizes([data])
    boxes = [(0, 0, w, h), (10, 20, 100, 224), (w - 224, 0, 224, 60), (5, 7, 40, 30), (0, h - 1, w, 1)]
    diffs = []
    for box in boxes:
        got = resize_view(rgb, box)
        want = torch.from_numpy(np.array(pil_view(data, box, flip=False))).permute(2, 0, 1).float()
        assert got.dtype == torch.float32 and got.shape == (3, SIZE, SIZE) and torch.equal(got, got.round())
        diffs.append((got - want).abs().mean().item())
    # PIL's arithmetic up to a level on a few pixels (PIL sometimes resamples the vertical pass
    # first), far below VIEW_BOUND; a box one pixel off or a plain bilinear resize costs levels.
    assert max(diffs) <= 0.2, diffs


@pytest.mark.usefixtures("one_torch_thread")
def test_torchvision_decoder_on_the_cpu_matches_pil_within_tolerance_and_flips_exactly(all_photos):
    names = list(all_photos)
    datas, boxes, flips = photo_views([all_photos[n] for n in names], seed=7, views=1)
    decoder = make_decoder("torchvision", batch_size=len(datas), device="cpu", num_threads=2)
    assert isinstance(decoder, TorchvisionViewDecoder) and decoder.device == torch.device("cpu")
    raw = TorchvisionViewDecoder(device="cpu", normalize=False)
    got = raw(datas, boxes, flips)
    want = pil_views(datas, boxes, flips, normalize=False)
    diffs = mean_abs(got, want)
    assert diffs.max() <= VIEW_BOUND, dict(zip(names, diffs.tolist()))
    assert diffs.mean() <= MEAN_BOUND
    by_pil = [k for k, d in enumerate(datas) if not jpeg_frame(d) or jpeg_frame(d)[4] == 4]
    assert by_pil and torch.equal(got[by_pil], want[by_pil])      # PNG, WebP, BMP, CMYK: PIL's pixels
    assert torch.equal(decoder(datas, boxes, flips), (got / 255 - torch.tensor(MEAN).view(1, 3, 1, 1))
                       / torch.tensor(STD).view(1, 3, 1, 1))
    jpeg = [k for k in range(len(datas)) if k not in by_pil]
    mirrored = raw([datas[k] for k in jpeg], boxes[jpeg], ~flips[jpeg])
    assert torch.equal(mirrored, got[jpeg].flip(-1))


def test_torchvision_decoder_error_names_the_first_bad_sample_as_pil_does(all_photos):
    jpeg, png = all_photos["astronaut_500.jpg"], all_photos["coins.png"]
    decoder = TorchvisionViewDecoder(device="cpu", num_threads=2)
    flips = np.zeros(3, bool)
    cases = [([jpeg, jpeg[:600], png], [[0, 0, 50, 50]] * 3),                       # a truncated JPEG
             ([jpeg, png, jpeg], [[0, 0, 50, 50], [0, 0, 50, 50], [460, 0, 50, 50]]),  # a box leaving one
             ([jpeg, png[:300], jpeg], [[0, 0, 50, 50]] * 3)]                        # a truncated PNG
    for datas, boxes in cases:
        with pytest.raises(DecodeError) as caught:
            decoder(datas, np.array(boxes), flips)
        with pytest.raises(DecodeError) as reference:
            pil_views(datas, np.array(boxes), flips)
        assert str(caught.value) == str(reference.value) and "\n" not in str(caught.value)
    assert "sample 2 of the batch" in str(caught.value) or "sample 1 of the batch" in str(caught.value)


def test_auto_without_dali_is_torchvision_on_cuda_and_pil_elsewhere(monkeypatch):
    import data.decoders as decoders

    assert decoders.resolve_decoder("auto", device="cuda:1") == "dali"          # DALI first where installed
    monkeypatch.setattr(decoders, "dali_installed", lambda: False)
    assert [decoders.resolve_decoder("auto", device=d) for d in ("cuda", "cuda:1", torch.device("cuda", 0))] == \
        ["torchvision"] * 3
    assert [decoders.resolve_decoder("auto", device=d) for d in ("cpu", None)] == ["pil", "pil"]
    assert decoders.resolve_decoder("pil", device="cuda") == "pil"
    assert make_decoder("auto", batch_size=2, device="cpu", num_threads=3).keywords == {"num_threads": 3}
    from data.decode.stored import make_view_decoder, pil_stored_views     # stored 224 px views: PIL

    assert make_view_decoder("jpeg", "torchvision", batch_size=2).func is pil_stored_views
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert make_decoder("auto", batch_size=2, device="cuda:2").device == torch.device("cuda", 2)
    assert make_decoder("torchvision", batch_size=2, device="cuda").device == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="'cpu' or 'cuda"):
        TorchvisionViewDecoder(device="meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torchvision_cuda_matches_pil_within_tolerance(all_photos):
    decoder = TorchvisionViewDecoder(device="cuda", normalize=False)
    datas, boxes, flips = photo_views(list(all_photos.values()), seed=5, views=2)
    got = decoder(datas, boxes, flips)
    assert got.device.type == "cuda" and got.shape == (len(datas), 3, SIZE, SIZE)
    want = pil_views(datas, boxes, flips, size=SIZE, normalize=False)
    diffs = mean_abs(got.cpu(), want)
    # nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: CUDA_BOUND_SCALE times the bounds.
    assert diffs.max() <= CUDA_BOUND_SCALE * VIEW_BOUND, diffs.tolist()
    assert diffs.mean() <= CUDA_BOUND_SCALE * MEAN_BOUND
    normalised = TorchvisionViewDecoder(device="cuda")(datas, boxes, flips)
    torch.testing.assert_close(denormalize(normalised), got, atol=1e-3, rtol=0)
