"""The raw format's PNG reader (storage.png) against Pillow and a reference filter encoder."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from storage import png
from storage.raw import RawDataset, RawFormatError, _png_bytes

ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def filtered(img: np.ndarray, filters) -> bytes:
    """Rows of ``img`` filtered with the given type per row (the PNG specification's definitions)."""
    h = img.shape[0]
    bpp = 1 if img.ndim == 2 else img.shape[2]
    x = img.reshape(h, -1).astype(np.int64)
    out = []
    for y in range(h):
        f = filters[y % len(filters)]
        cur = x[y]
        up = x[y - 1] if y else np.zeros_like(cur)
        left = np.concatenate([np.zeros(bpp, np.int64), cur[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int64), up[:-bpp]])
        if f == 0:
            pred = np.zeros_like(cur)
        elif f == 1:
            pred = left
        elif f == 2:
            pred = up
        elif f == 3:
            pred = (left + up) // 2
        else:
            p = left + up - upleft
            pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
        out.append(bytes([f]) + ((cur - pred) % 256).astype(np.uint8).tobytes())
    return b"".join(out)


def png_file(img: np.ndarray, filters=(0,), *, idat_parts: int = 1, interlace: int = 0, data: bytes | None = None,
             height: int | None = None, stream: bytes | None = None) -> bytes:
    h, w = img.shape[:2]
    ctype = 0 if img.ndim == 2 else 2
    if data is None:
        if interlace:
            data = b"".join(filtered(img[y0::dy, x0::dx], filters) for x0, y0, dx, dy in ADAM7
                            if img[y0::dy, x0::dx].size)
        else:
            data = filtered(img, filters)
    z = zlib.compress(data, 6) if stream is None else stream
    cuts = np.linspace(0, len(z), idat_parts + 1).astype(int)
    ihdr = struct.pack(">IIBBBBB", w, height or h, 8, ctype, 0, 0, interlace)
    return (png.SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"tEXt", b"Comment\0pixelface test")
            + b"".join(chunk(b"IDAT", z[a:b]) for a, b in zip(cuts[:-1], cuts[1:])) + chunk(b"IEND", b""))


def pillow(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


@pytest.mark.parametrize("shape", [(37, 29), (16, 9, 3), (1, 1), (3, 1, 3)])
@pytest.mark.parametrize("filters", [(0,), (1,), (2,), (3,), (4,), (0, 1, 2, 3, 4), (4, 3, 2, 1, 0)])
def test_every_filter_type_decodes_like_pillow(shape, filters):
    img = np.random.default_rng(sum(shape) + 7 * filters[0]).integers(0, 256, shape, dtype=np.uint8)
    img[: shape[0] // 2] //= 4   # some smooth rows too, so Paeth picks every predictor
    data = png_file(img, filters, idat_parts=3)
    got = png.decode(data)
    assert got.dtype == np.uint8 and got.shape == shape
    np.testing.assert_array_equal(got, img)
    np.testing.assert_array_equal(pillow(data), img)


def test_pillow_and_simulator_files_decode_identically_in_place():
    rng = np.random.default_rng(1)
    for img in (rng.integers(0, 256, (64, 80), dtype=np.uint8), rng.integers(0, 256, (30, 41, 3), dtype=np.uint8)):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "PNG", optimize=True)   # Pillow's adaptive filters
        np.testing.assert_array_equal(png.decode(buf.getvalue()), img)
        out = np.zeros_like(img)
        assert png.decode(_png_bytes(img, 1), out) is out
        np.testing.assert_array_equal(out, img)
        strided = np.zeros((img.shape[1], img.shape[0]) + img.shape[2:], np.uint8).swapaxes(0, 1)
        with pytest.raises(ValueError, match="C-contiguous"):
            png.decode(_png_bytes(img, 1), strided)


@pytest.mark.parametrize("damage, needle", [
    (lambda d: d[:40], "ends inside a chunk header"),
    (lambda d: d[:-20], "the file ends first"),
    (lambda d: d[:-12], "no IEND"),
    (lambda d: d[:60] + bytes([d[60] ^ 0xFF]) + d[61:], "CRC mismatch"),
    (lambda d: b"GIF89a" + d[6:], "not a PNG file"),
])
def test_damaged_bytes_are_refused_with_the_reason(damage, needle):
    img = np.random.default_rng(2).integers(0, 256, (40, 50), dtype=np.uint8)
    with pytest.raises(png.PNGError, match=needle):
        png.decode(damage(png_file(img, (1, 4))))


def test_wrong_amount_of_data_unknown_filter_and_interlace_are_refused():
    img = np.random.default_rng(3).integers(0, 256, (20, 10), dtype=np.uint8)
    rows = filtered(img, (0,))
    with pytest.raises(png.PNGError, match="too much image data"):   # claims 19 rows, holds 20
        png.decode(png_file(img, data=rows, height=19))
    with pytest.raises(png.PNGError, match="too little image data"):
        png.decode(png_file(img, data=rows[:-5]))
    with pytest.raises(png.PNGError, match="corrupt image data"):
        png.decode(png_file(img, stream=zlib.compress(rows, 6)[:2] + b"\xff" * 10 + zlib.compress(rows, 6)[12:]))
    with pytest.raises(png.PNGError, match="truncated image data: 194 of 220 bytes"):
        png.decode(png_file(img, stream=zlib.compress(rows, 6)[:-30]))
    with pytest.raises(png.PNGError, match="truncated image data: the compressed stream does not end"):
        png.decode(png_file(img, stream=zlib.compress(rows, 6)[:-4]))   # every byte there, no checksum
    bad = bytearray(rows)
    bad[11 * 5] = 7                                                   # row 5's filter byte
    with pytest.raises(png.PNGError, match="row 5: unknown filter type 7"):
        png.decode(png_file(img, data=bytes(bad)))
    with pytest.raises(png.PNGError, match="interlaced"):
        png.decode(png_file(img, interlace=1))


def test_a_bomb_stream_is_never_inflated_past_the_claimed_size():
    # 4x4 claimed, a stream of 50 MB of zeros behind it (compresses to ~50 kB)
    data = png_file(np.zeros((4, 4), np.uint8), data=b"\0" * 50_000_000)
    with pytest.raises(png.PNGError, match="too much image data: more than the 20 bytes"):
        png.decode(data)


def test_raw_reader_decodes_interlaced_files_with_pillow(tmp_path):
    img = np.random.default_rng(4).integers(0, 256, (21, 13), dtype=np.uint8)
    path = tmp_path / "adam7.png"
    path.write_bytes(png_file(img, (0, 2, 4), interlace=1))
    np.testing.assert_array_equal(pillow(path.read_bytes()), img)
    ds = RawDataset.__new__(RawDataset)   # only the image reader is exercised
    ds.max_pixels = 4096 * 4096
    np.testing.assert_array_equal(ds._image(path, (21, 13), "L", subject="S0000"), img)
    path.write_bytes(path.read_bytes() + b"\0" * (2 << 20))
    with pytest.raises(RawFormatError, match="more than a 13x21 L PNG can need"):
        ds._image(path, (21, 13), "L", subject="S0000")
