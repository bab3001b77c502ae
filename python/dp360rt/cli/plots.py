"""A per-stage bar chart drawn with Pillow (no plotting library needed)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw


def bar_chart(values: dict[str, float], path: str | Path, title: str, unit: str = "s") -> Path:
    """Horizontal bars, one per stage, labelled with their values; writes a PNG."""
    items = [(k, float(v)) for k, v in values.items()]
    row, left, width = 26, 170, 420
    img = Image.new("RGB", (left + width + 110, 40 + row * max(1, len(items))), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), title, fill="black")
    top = max((v for _, v in items), default=1.0) or 1.0
    for i, (k, v) in enumerate(items):
        y = 36 + i * row
        d.text((10, y + 5), k[:26], fill="black")
        w = int(width * v / top)
        d.rectangle([left, y + 3, left + max(w, 1), y + row - 5], fill=(70, 110, 190))
        d.text((left + w + 6, y + 5), f"{v:.3f} {unit}", fill="black")
    img.save(path)
    return Path(path)
