"""Draw `examples/scene.jpg`, the bundled example picture (a house, a tree, the sun; 960x720).

Procedural so the project ships no third-party photo. Run: python scripts/make_example_image.py
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

W, H = 960, 720


def main() -> None:
    rng = np.random.default_rng(7)
    sky = np.linspace([110, 170, 235], [200, 225, 250], H // 2 + 60)
    img = np.zeros((H, W, 3), np.float32)
    img[: H // 2 + 60] = sky[:, None]
    img[H // 2 + 60:] = (86, 150, 70)
    img += rng.normal(0, 4, img.shape)  # a little texture so nothing is perfectly flat
    canvas = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(canvas)
    d.ellipse((760, 60, 860, 160), fill=(250, 215, 80))  # sun
    d.ellipse((-200, 330, 500, 600), fill=(96, 160, 78))  # hill
    d.rectangle((380, 330, 640, 560), fill=(205, 120, 90))  # house
    d.polygon([(360, 335), (510, 220), (660, 335)], fill=(120, 50, 40))  # roof
    d.rectangle((480, 440, 540, 560), fill=(90, 60, 40))  # door
    d.rectangle((405, 370, 460, 420), fill=(180, 215, 240))  # windows
    d.rectangle((565, 370, 620, 420), fill=(180, 215, 240))
    d.rectangle((160, 380, 190, 560), fill=(110, 75, 45))  # tree trunk
    d.ellipse((95, 250, 255, 410), fill=(40, 110, 50))  # tree crown
    d.polygon([(480, 560), (540, 560), (700, 720), (380, 720)], fill=(170, 160, 140))  # path
    d.ellipse((720, 560, 800, 610), fill=(240, 240, 235))  # a white ball on the grass
    out = Path(__file__).resolve().parents[1] / "examples" / "scene.jpg"
    canvas.filter(ImageFilter.SMOOTH).save(out, quality=90)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
