"""Opening an image a user gives (a path or an upload): refuse non-images, folders and decompression
bombs with one line naming the input; never unpickle or execute anything."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

MAX_IMAGE_PIXELS = 4096 * 4096


def load_image(source, max_side: int = 1024) -> Image.Image:
    """Open an image path or file-like object as RGB; refuse non-images, downscale very large ones.

    Raises ValueError with one line naming the input; never unpickles or executes anything.
    """
    name = getattr(source, "name", source)
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        raise ValueError(f"image {name} is a folder; expected a PNG or JPEG file")
    if isinstance(source, (str, Path)) and not Path(source).is_file():
        raise ValueError(f"image {name} does not exist; expected a PNG or JPEG file")
    try:
        with Image.open(source) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"image {name} is {im.width}x{im.height}; expected at most "
                                 f"{MAX_IMAGE_PIXELS:,} pixels")
            im.load()
            image = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"{name} is not a readable image ({type(e).__name__}); expected a PNG or JPEG file") from None
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side))
    return image
