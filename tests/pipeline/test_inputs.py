"""The image checks every pipeline input goes through (``d3s2.models.conditioner.load_image``): sizes a run
cannot use are clear ValueErrors that name the file, decided on the header before any pixel is decoded."""

import io
import re
import threading
import warnings

import numpy as np
import pytest
from PIL import Image

from d3s2.models.conditioner import MIN_IMAGE_SIDE, load_image

from .tiny import damaged_exif_images, png_header_only, rgba_image, stored_image_variants


def test_a_decompression_bomb_is_refused_on_its_header(tmp_path):
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header_only(100_000, 100_000))  # PIL itself raises above twice its limit
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ValueError, match=re.escape(f"image {huge} is too large: expected at most {limit} pixels")):
        load_image(huge)


def test_above_the_pixel_limit_but_below_twice_it_is_refused_too(tmp_path, monkeypatch):
    image = tmp_path / "big.png"
    Image.fromarray(rgba_image(40)).save(image)  # 1600 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL only warns between 1000 and 2000
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(
            ValueError, match=re.escape(f"image {image} is too large: expected at most 1000 pixels") + ".*, got 40x40"):
        load_image(image)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # PIL's way to lift the limit
    assert load_image(image).size == (40, 40)


def test_images_smaller_than_the_minimum_are_refused(tmp_path):
    dot = tmp_path / "dot.png"
    Image.fromarray(rgba_image(1)).save(dot)
    with pytest.raises(ValueError, match=re.escape(f"image {dot}: expected at least 16x16 pixels, got 1x1")):
        load_image(dot)
    with pytest.raises(ValueError, match="expected at least 16x16 pixels, got 20x8"):
        load_image(np.zeros((8, 20, 4), np.uint8))
    assert load_image(rgba_image(MIN_IMAGE_SIDE)).size == (MIN_IMAGE_SIDE, MIN_IMAGE_SIDE)


@pytest.mark.parametrize("variant", ["exif rotated", "exif rotated TIFF", "16-bit gray", "float gray",
                                     "tRNS key colour", "opaque alpha"])
def test_images_are_read_as_a_viewer_shows_them(tmp_path, variant):
    data, expected = stored_image_variants()[variant]
    path = tmp_path / "image.png"
    path.write_bytes(data)
    np.testing.assert_array_equal(np.asarray(load_image(path)), expected)
    with Image.open(path) as img:  # an opened PIL image is read the same way
        np.testing.assert_array_equal(np.asarray(load_image(img)), expected)


def test_a_directory_is_named_as_such_not_as_missing(tmp_path):
    with pytest.raises(IsADirectoryError, match=re.escape(f"{tmp_path} is a directory, expected an image file")):
        load_image(tmp_path)


DAMAGED_EXIF_WARNINGS = {  # PIL's complaint, and whether the orientation could still be read
    "entry count past the block (JPEG)": "damaged EXIF metadata (Corrupt EXIF data. Expecting to read 12 bytes but "
                                         "only got 2.): its orientation tag was read and applied",
    "tag data past the block (JPEG)": "damaged EXIF metadata (Truncated File Read): no orientation could be read from "
                                      "it, so the pixels are used as stored",
    "not a TIFF header (PNG)": "damaged EXIF metadata (not a TIFF file (header b'XX\\x00*\\x00\\x00\\x00\\x08' not "
                               "valid)): no orientation could be read from it",
    "a rational stored as text (PNG)": None,  # read without complaint (PIL's exif_transpose fails rewriting it)
}


@pytest.mark.parametrize("case", list(DAMAGED_EXIF_WARNINGS))
def test_damaged_exif_keeps_the_image_with_one_warning(tmp_path, case):
    data, fmt, expected = damaged_exif_images()[case]
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = np.asarray(load_image(path))
    assert loaded.shape == expected.shape
    assert np.abs(loaded.astype(int) - expected).mean() < 3  # JPEG's loss on flat blocks
    # d3s2's own warning only: none of PIL's raw ones, which name no image
    messages = [str(w.message) for w in caught]
    assert messages == ([] if DAMAGED_EXIF_WARNINGS[case] is None else [messages[0]])
    if DAMAGED_EXIF_WARNINGS[case] is not None:
        assert messages[0].startswith(DAMAGED_EXIF_WARNINGS[case])


def test_exif_warnings_of_two_threads_do_not_mix(monkeypatch):
    # catch_warnings swaps process-wide state. Here thread "second" enters its EXIF block while "first" is inside
    # its own, and leaves it after "first" has left (without the lock it would then restore the warnings state
    # "first" had installed, a recorder, for good); with the lock "second" waits at the block's entry instead,
    # and "first" stops waiting for it after 1 s.
    from d3s2.models.conditioner import exif_upright

    data = damaged_exif_images()["not a TIFF header (PNG)"][0]
    read_exif = Image.Image.getexif
    first_inside, second_inside, first_done = threading.Event(), threading.Event(), threading.Event()

    def getexif(img):
        if threading.current_thread().name == "first":
            first_inside.set()
            second_inside.wait(timeout=1.0)
        else:
            second_inside.set()
            first_done.wait(timeout=5.0)
        return read_exif(img)

    def run():
        exif_upright(Image.open(io.BytesIO(data)))
        if threading.current_thread().name == "first":
            first_done.set()

    monkeypatch.setattr(Image.Image, "getexif", getexif)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the damaged-EXIF warnings themselves are not this test's subject
        before = (list(warnings.filters), warnings.showwarning)
        first, second = (threading.Thread(target=run, name=name) for name in ("first", "second"))
        first.start()
        assert first_inside.wait(timeout=5.0)
        second.start()
        first.join(timeout=10)
        second.join(timeout=10)
        assert (list(warnings.filters), warnings.showwarning) == before
