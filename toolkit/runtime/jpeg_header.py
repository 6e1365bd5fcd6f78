"""What the GPU JPEG decoder needs to know before decoding, read from a file's first bytes: is it a JPEG that
nvJPEG decodes the way libjpeg does (baseline or progressive Huffman, 1 or 3 components), and its EXIF orientation.

The GPU decoder ignores EXIF orientation; :func:`orient` turns a decoded [3,H,W] tensor the way
``torchvision.io.decode_image(apply_exif_orientation=True)`` does (tag 0x0112 of the first Exif APP1 segment),
so boxes refer to the image as viewers show it on either path.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

_SOF_HUFFMAN = {0xC0, 0xC1, 0xC2}  # baseline, extended sequential, progressive (Huffman): nvJPEG decodes these
_SOF_OTHER = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # lossless, hierarchical, arithmetic


@dataclass(frozen=True)
class JpegHeader:
    gpu_decodable: bool  # a JPEG the GPU path decodes (else: the CPU path, which also reports broken files)
    orientation: int = 1  # EXIF orientation 1..8 (1: as stored)
    width: int = 0
    height: int = 0


NOT_FOR_GPU = JpegHeader(False)


def parse_jpeg_header(data: bytes | memoryview) -> JpegHeader:
    """Markers from SOI up to the first SOS, and the EOI near the end; anything unexpected routes the file to the CPU path."""
    buf = bytes(data[:2])
    if buf != b"\xff\xd8":
        return NOT_FOR_GPU
    n, pos, orientation, sof = len(data), 2, 1, None
    exif_seen = False
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return NOT_FOR_GPU
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # stand-alone markers
            pos += 2
            continue
        (length,) = struct.unpack(">H", bytes(data[pos + 2:pos + 4]))
        if length < 2 or pos + 2 + length > n:
            return NOT_FOR_GPU
        seg = bytes(data[pos + 4:pos + 2 + length])
        if marker == 0xE1 and not exif_seen and seg[:6] == b"Exif\x00\x00":
            exif_seen = True
            orientation = _exif_orientation(seg[6:])
        elif marker in _SOF_OTHER:
            return NOT_FOR_GPU
        elif marker in _SOF_HUFFMAN:
            if len(seg) < 6:
                return NOT_FOR_GPU
            precision, height, width, comps = struct.unpack(">BHHB", seg[:6])
            if precision != 8 or comps not in (1, 3) or not height or not width:  # CMYK, 12-bit: libjpeg on the CPU
                return NOT_FOR_GPU
            sof = (width, height)
        elif marker == 0xDA:  # start of scan: the header is complete
            if sof is None or b"\xff\xd9" not in bytes(data[max(pos, n - 1024):]):
                return NOT_FOR_GPU  # no end-of-image marker: truncated (libjpeg refuses it; nvJPEG may not)
            return JpegHeader(True, orientation, *sof)
        pos += 2 + length
    return NOT_FOR_GPU


def _exif_orientation(tiff: bytes) -> int:
    """Tag 0x0112 of IFD0; 1 where it is missing or malformed (as torchvision reads it)."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    e = "<" if tiff[:2] == b"II" else ">"
    (ifd,) = struct.unpack(e + "I", tiff[4:8])
    if ifd + 2 > len(tiff):
        return 1
    (count,) = struct.unpack(e + "H", tiff[ifd:ifd + 2])
    for i in range(count):
        off = ifd + 2 + 12 * i
        if off + 12 > len(tiff):
            return 1
        tag, typ = struct.unpack(e + "HH", tiff[off:off + 4])
        if tag == 0x0112:
            if typ != 3:  # SHORT
                return 1
            (value,) = struct.unpack(e + "H", tiff[off + 8:off + 10])
            return value if 1 <= value <= 8 else 1
    return 1


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """[..., H, W] as displayed for an EXIF orientation (the transforms of torchvision's decoders)."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return image.transpose(-2, -1).flip(-1)
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return image.transpose(-2, -1).flip(-2)
    return image
